"""``smartbin-classify``: send image files to a running service and print its answers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from edge_service.tls import channel_credentials
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc


def open_channel(
    target: str,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """A plaintext channel, or a TLS one when any of ``ca``, ``cert``, ``key`` is given.

    Args:
        target: service address, host:port.
        ca: PEM CA bundle that signed the service's certificate (system roots when None).
        cert: PEM client certificate, for a service that requires mutual TLS.
        key: PEM private key of ``cert``.
        server_name: name to check the service's certificate against, when it differs from
            the host in ``target``.

    Raises:
        ValueError: a certificate file is unreadable, or only one of cert and key was given.
    """
    if ca is None and cert is None and key is None:
        return grpc.insecure_channel(target)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, channel_credentials(ca, cert, key), options=options)


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """The --ca/--cert/--key/--server-name flags every smartbin client takes."""
    tls = parser.add_argument_group("TLS (plaintext unless one of --ca, --cert, --key is given)")
    tls.add_argument("--ca", type=Path, help="PEM CA bundle that signed the service certificate")
    tls.add_argument("--cert", type=Path, help="PEM client certificate (mutual TLS)")
    tls.add_argument("--key", type=Path, help="PEM private key of --cert")
    tls.add_argument("--server-name", help="name on the service certificate, if not the host")


def channel_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> grpc.Channel:
    """The channel that ``--target`` and the TLS flags describe; a bad flag is a usage error."""
    try:
        return open_channel(args.target, args.ca, args.cert, args.key, args.server_name)
    except ValueError as err:
        parser.error(str(err))


def classify_file(
    stub: classifier_pb2_grpc.ClassifierStub, path: Path, top_k: int, timeout: float
) -> classifier_pb2.ClassifyResponse:
    return stub.Classify(
        classifier_pb2.ClassifyRequest(image=path.read_bytes(), top_k=top_k), timeout=timeout
    )


def format_answer(path: Path, response: classifier_pb2.ClassifyResponse) -> str:
    ranked = ", ".join(f"{p.label} {p.score:.2f}" for p in response.predictions)
    flag = "  (unsure)" if response.unsure else ""
    total_ms = response.timings.total_seconds * 1000
    return f"{path.name:<24} {ranked}{flag}  [{total_ms:.1f} ms, model {response.model_version}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Classify image files with a smartbin service.")
    parser.add_argument("images", nargs="+", type=Path, help="image files to classify")
    parser.add_argument("--target", default="localhost:50051", help="service address host:port")
    parser.add_argument("--top-k", type=int, default=3, help="labels to show per image (0: all)")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")
    add_tls_arguments(parser)
    args = parser.parse_args(argv)
    channel = channel_from_args(parser, args)
    failures = 0
    with channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        for path in args.images:
            try:
                print(format_answer(path, classify_file(stub, path, args.top_k, args.timeout)))
            except OSError as err:
                failures += 1
                print(f"{path}: cannot read: {err}", file=sys.stderr)
            except grpc.RpcError as err:
                failures += 1
                print(f"{path}: {err.code().name}: {err.details()}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
