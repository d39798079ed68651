"""``smartbin-demo``: serve the embedded default bundle and classify the sample photos.

Starts the real service on free localhost ports, calls it over gRPC like bin firmware would,
shows its health and a few lines of /metrics, then shuts it down.
"""

from __future__ import annotations

import argparse
import logging
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_service.client import classify_file, format_answer
from edge_service.config import ServiceConfig
from edge_service.const import DEFAULT_BUNDLE_DIR, SAMPLES_DIR
from edge_service.server import create_server
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE_DIR)
    parser.add_argument("--images", type=Path, default=SAMPLES_DIR, help="folder of photos")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    config = ServiceConfig(
        bundle=args.bundle, host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0
    )
    service = create_server(config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            health_state = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            info = classifier_pb2_grpc.ClassifierStub(channel).GetModelInfo(
                classifier_pb2.GetModelInfoRequest(), timeout=5
            )
            print(
                f"service on 127.0.0.1:{service.port}: "
                f"{health_pb2.HealthCheckResponse.ServingStatus.Name(health_state.status)}"
            )
            print(
                f"model {info.model_version} ({info.quantization}), labels: "
                f"{', '.join(info.labels)}"
            )
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            for path in sorted(
                p
                for p in args.images.iterdir()
                if p.is_file() and p.suffix.lower() in {".jpg", ".jpeg", ".png"}
            ):
                print(format_answer(path, classify_file(stub, path, top_k=3, timeout=10)))
        url = f"http://127.0.0.1:{service.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        print(f"\n{url} (excerpt):")
        for line in text.splitlines():
            # Every label and status code is exported from 0; the excerpt shows what the demo did.
            counted = not line.endswith(" 0.0")
            if counted and line.startswith(("smartbin_requests_total", "smartbin_classifications")):
                print("  " + line)
    finally:
        service.stop(grace=1)


if __name__ == "__main__":
    main()
