"""The Open Inference Protocol (KServe's predict API v2, package ``inference``): the gRPC stubs
generated from ``grpc_predict_v2.proto``, which is KServe's, under the Apache License 2.0 (the
LICENSE file beside it)."""
