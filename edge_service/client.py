"""``smartbin-classify``: send image files to a running service and print its answers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from smartbin.channel import add_tls_arguments, channel_from_args
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc


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
