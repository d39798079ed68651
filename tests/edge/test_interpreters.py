"""Several interpreters serve calls side by side and answer exactly as one does."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
from helpers import local_config

from edge_service.const import SAMPLES_DIR
from edge_service.server import create_server
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc


def answers(stub: classifier_pb2_grpc.ClassifierStub, photos: list[bytes], workers: int) -> list:
    def classify(photo: bytes) -> list[tuple[str, float]]:
        reply = stub.Classify(classifier_pb2.ClassifyRequest(image=photo), timeout=30)
        return [(p.label, p.score) for p in reply.predictions]

    with futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(classify, photos))


def test_calls_side_by_side_get_the_answers_of_calls_one_at_a_time(default_bundle: Path) -> None:
    # Each sample twice: a dozen calls, enough for six callers to overlap on three interpreters.
    photos = [path.read_bytes() for path in sorted(SAMPLES_DIR.glob("*.jpg"))] * 2
    service = create_server(local_config(default_bundle, interpreters=3))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            one_at_a_time = answers(stub, photos, workers=1)
            side_by_side = answers(stub, photos, workers=6)
    finally:
        service.stop(grace=1)
    assert side_by_side == one_at_a_time
    assert len({a[0][0] for a in one_at_a_time}) > 1  # the photos get different best labels
