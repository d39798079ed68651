"""``smartbin-healthcheck``: exit 0 when the service reports SERVING on the gRPC health service.

The container image's HEALTHCHECK runs it. It speaks only the standard ``grpc.health.v1`` protocol,
so it judges what load balancers and orchestrators see, not a private endpoint.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_service.const import DEFAULT_GRPC_PORT
from smartbin.channel import add_tls_arguments, channel_from_args


def check(
    target: str, service: str = "", timeout: float = 3.0, channel: grpc.Channel | None = None
) -> tuple[bool, str]:
    """Ask the health service at ``target`` about ``service`` ("" is the whole server).

    Args:
        channel: an open channel to ``target`` (TLS, say); plaintext when None.

    Returns:
        Whether it is SERVING, and a one-line description of the answer.
    """
    with channel or grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as err:
            return False, f"{target}: {err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target", default=f"127.0.0.1:{DEFAULT_GRPC_PORT}", help="service address host:port"
    )
    parser.add_argument("--service", default="", help="service name to ask about; '' = server")
    parser.add_argument("--timeout", type=float, default=3.0, help="deadline, seconds")
    add_tls_arguments(parser)
    args = parser.parse_args(argv)
    serving, description = check(
        args.target, args.service, args.timeout, channel_from_args(parser, args)
    )
    print(description, file=sys.stdout if serving else sys.stderr)
    sys.exit(0 if serving else 1)


if __name__ == "__main__":
    main()
