"""The one Classify load of the tools: threads calling Classify back to back until a stop time,
each call's latency and status code recorded. ``smartbin-load`` reports intervals and samples
memory on top of it; ``smartbin-bench`` accounts CPU time around it. The same loop
(:class:`smartbin_tools.loop.CallLoad`) drives the peers of ``smartbin-bench-peers`` over HTTP
and in process."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from smartbin.v1 import classifier_pb2, classifier_pb2_grpc
from smartbin_tools.loop import Call, CallLoad

__all__ = ["Call", "CallLoad", "ClassifyLoad"]


class ClassifyLoad(CallLoad):
    """``concurrency`` threads calling Classify back to back, thread ``i`` sending
    ``requests[i]``, ``requests[i + 1]``... in turn, until the stop time or ``stop()``.

    Times are ``time.perf_counter()`` seconds; ``calls`` grows in the order calls end.
    """

    failures = (grpc.RpcError,)

    def __init__(
        self,
        stub: classifier_pb2_grpc.ClassifierStub,
        requests: Sequence[classifier_pb2.ClassifyRequest],
        concurrency: int,
        timeout: float = 30.0,
    ) -> None:
        if not requests or concurrency < 1:
            raise ValueError("a load needs a request and at least one thread")
        super().__init__(concurrency)
        self.stub = stub
        self.requests = list(requests)
        self.timeout = timeout

    def call(self, index: int) -> None:
        self.stub.Classify(self.requests[index % len(self.requests)], timeout=self.timeout)

    def code(self, error: BaseException) -> str:
        code = error.code() if isinstance(error, grpc.RpcError) else None
        return code.name if code else "UNKNOWN"
