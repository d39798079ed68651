"""``smartbin-load``: a bounded Classify load on a service on this machine.

Runs Classify from N threads for a set time against a service on loopback (one it starts itself
with ``smartbin-serve``, or ``--target``), then stops by itself. Reports calls/s, p50/p95/p99
latency, errors by status code and the server's resident memory over time. Refuses any target
that is not loopback: it is a measuring tool, not a way to load someone else's bin.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import logging
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import grpc
import numpy as np
import psutil
from PIL import Image

from smartbin.channel import add_tls_arguments, open_channel
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc
from smartbin_tools.load import Call, ClassifyLoad
from smartbin_tools.paths import DEFAULT_BUNDLE_DIR, SAMPLES_DIR
from smartbin_tools.service import ServiceProcess, serve_args, spawn_service
from smartbin_tools.stats import percentiles_ms

MAX_DURATION_SECONDS = 3600.0
MAX_CONCURRENCY = 256
# A thread whose call was refused at once (the service is down or full) waits before its next
# call, doubling the wait up to the most, so that a dead target is not called thousands of times
# a second.
BACKOFF_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
BACKOFF_FIRST_SECONDS = 0.05
BACKOFF_MOST_SECONDS = 1.0
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class NotLoopbackError(ValueError):
    """The target is not an address of this machine's loopback interface."""


def require_loopback(target: str) -> None:
    """Accept ``host:port`` only when every address ``host`` resolves to is loopback.

    Raises:
        NotLoopbackError: the host is not loopback, does not resolve, or has no port.
    """
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise NotLoopbackError(f"target {target!r} is not host:port")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)
    except socket.gaierror as err:
        raise NotLoopbackError(f"cannot resolve {host!r}: {err}") from err
    addresses = {str(info[4][0]) for info in infos}
    outside = sorted(a for a in addresses if not ipaddress.ip_address(a).is_loopback)
    if outside:
        raise NotLoopbackError(
            f"{host!r} resolves to {', '.join(outside)}: smartbin-load only targets loopback "
            "(127.0.0.1, ::1, localhost), a service on this machine"
        )


def load_images(folder: Path | None) -> list[bytes]:
    """Encoded photos from ``folder``; one generated photo-sized JPEG when there are none."""
    if folder is not None and folder.is_dir():
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if paths:
            return [p.read_bytes() for p in paths]
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return [buffer.getvalue()]


class BackoffStub:
    """A Classifier stub whose Classify, after a call refused with one of ``BACKOFF_CODES``,
    waits before raising (per thread, doubling while refusals go on, never past ``until()``)."""

    def __init__(
        self, stub: classifier_pb2_grpc.ClassifierStub, until: Callable[[], float]
    ) -> None:
        self._stub = stub
        self._until = until
        self._refused = threading.local()

    def Classify(self, request: Any, timeout: float | None = None) -> Any:  # noqa: N802
        try:
            reply = self._stub.Classify(request, timeout=timeout)
        except grpc.RpcError as err:
            if err.code() in BACKOFF_CODES:
                self._wait()
            raise
        self._refused.count = 0
        return reply

    def _wait(self) -> None:
        count = getattr(self._refused, "count", 0)
        self._refused.count = count + 1
        delay = min(BACKOFF_FIRST_SECONDS * 2**count, BACKOFF_MOST_SECONDS)
        left = self._until() - time.perf_counter()
        if left > 0:
            time.sleep(min(delay, left))


class RssSampler:
    """Samples a process's resident memory every ``every`` seconds (none without a pid, and
    none once the process has ended: an ended process that is not yet reaped reads 0)."""

    def __init__(self, pid: int | None, every: float = 1.0) -> None:
        self.samples: list[int] = []
        self.gone = False
        self._process: psutil.Process | None = None
        if pid is not None:
            try:
                self._process = psutil.Process(pid)
            except psutil.Error:
                self.gone = True
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def latest(self) -> int | None:
        return self.samples[-1] if self.samples else None

    def sample(self) -> None:
        # When the process has ended, keep what was measured.
        if self._process is None or self.gone:
            return
        try:
            if self._process.status() == psutil.STATUS_ZOMBIE:
                raise psutil.ZombieProcess(self._process.pid)
            rss = int(self._process.memory_info().rss)
        except psutil.Error:
            self.gone = True
            return
        if rss:
            self.samples.append(rss)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.sample()

    def start(self) -> None:
        if self._process is not None:
            self.sample()
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.sample()


def summarise(calls: list[Call], seconds: float) -> dict[str, Any]:
    """Answered calls/s, latency percentiles of answered calls, failed calls by code.

    Only answered calls make the rate: calls refused by a dead or full target come back at
    once, and counted as calls they would show a service thousands of times faster than it is.
    """
    codes = Counter(c.code for c in calls)
    ok = [c.seconds for c in calls if c.code == "OK"]
    return {
        "calls": len(calls),
        "calls_per_second": len(ok) / seconds if seconds > 0 else 0.0,
        **percentiles_ms(ok),
        "max_ms": max(ok) * 1000 if ok else float("nan"),
        "errors": len(calls) - len(ok),
        "errors_by_code": {code: n for code, n in codes.items() if code != "OK"},
    }


@dataclass
class LoadSettings:
    target: str
    concurrency: int
    duration: float
    report_every: float
    timeout: float
    top_k: int = 0


class LoadRun:
    """A Classify load on ``channel`` with a line per interval and the server's memory."""

    def __init__(
        self, settings: LoadSettings, channel: grpc.Channel, images: list[bytes], pid: int | None
    ) -> None:
        self.settings = settings
        requests = [
            classifier_pb2.ClassifyRequest(image=image, top_k=settings.top_k) for image in images
        ]
        # ClassifyLoad calls only Classify, which BackoffStub has.
        stub = cast(
            classifier_pb2_grpc.ClassifierStub,
            BackoffStub(
                classifier_pb2_grpc.ClassifierStub(channel), until=lambda: self.load.deadline
            ),
        )
        self.load = ClassifyLoad(stub, requests, settings.concurrency, settings.timeout)
        self.rss = RssSampler(pid)
        self.intervals: list[dict[str, Any]] = []

    def run(self, out: TextIO = sys.stdout) -> dict[str, Any]:
        """Run the load, print a line per interval and return the summary."""
        s = self.settings
        self.rss.start()
        rss_before = self.rss.latest()
        print(
            f"{'t s':>6} {'calls/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
            f"{'errors':>6} {'RSS MB':>7}",
            file=out,
            flush=True,
        )
        start = self.load.start(s.duration)
        seen = 0
        try:
            while (left := self.load.deadline - time.perf_counter()) > 0:
                time.sleep(min(s.report_every, left))
                seen = self._report_interval(start, seen, out)
        except KeyboardInterrupt:
            print("interrupted: stopping", file=out)
        finally:
            self.load.stop()
            elapsed = self.load.join(s.timeout + 5)
        self.rss.stop()
        return self._summary(elapsed, rss_before)

    def _report_interval(self, start: float, seen: int, out: TextIO) -> int:
        """Print the calls that ended since the last line; the calls seen so far."""
        now = time.perf_counter()
        fresh = self.load.calls_since(seen)
        previous_end = self.intervals[-1]["t"] if self.intervals else 0.0
        row = summarise(fresh, max(now - start - previous_end, 1e-9))
        rss = None if self.rss.gone else self.rss.latest()
        self.intervals.append({"t": now - start, **row, "rss_bytes": rss})
        rss_text = f"{rss / 2**20:7.1f}" if rss else ("   gone" if self.rss.gone else "    n/a")
        print(
            f"{now - start:6.0f} {row['calls_per_second']:8.1f} {row['p50_ms']:7.1f} "
            f"{row['p95_ms']:7.1f} {row['p99_ms']:7.1f} {row['errors']:6d} {rss_text}",
            file=out,
            flush=True,
        )
        return seen + len(fresh)

    def _summary(self, elapsed: float, rss_before: int | None) -> dict[str, Any]:
        rss = self.rss.samples
        return {
            "settings": asdict(self.settings),
            "seconds": elapsed,
            **summarise(self.load.calls, elapsed),
            "rss_bytes": {
                "before": rss_before,
                "after_first_interval": self.intervals[0]["rss_bytes"] if self.intervals else None,
                "end": rss[-1] if rss else None,
                "max": max(rss) if rss else None,
            },
            "server_gone": self.rss.gone,
            "intervals": self.intervals,
        }


def format_summary(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    lines = [
        f"\n{summary['seconds']:.0f} s at concurrency {s['concurrency']} against {s['target']}",
        f"{'calls':>8} {'calls/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'errors':>6}",
        f"{summary['calls']:8d} {summary['calls_per_second']:8.1f} {summary['p50_ms']:7.1f} "
        f"{summary['p95_ms']:7.1f} {summary['p99_ms']:7.1f} {summary['max_ms']:7.1f} "
        f"{summary['errors']:6d}",
    ]
    if summary["errors_by_code"]:
        lines.append(f"errors by code: {summary['errors_by_code']}")
    if summary["calls"] and summary["errors"] == summary["calls"]:
        lines.append(
            f"no call was answered: all {summary['calls']} failed; is the service at "
            f"{s['target']} running?"
        )
    if summary.get("server_gone"):
        lines.append("the server process ended during the run")
    rss = summary["rss_bytes"]
    if rss["end"] is not None:
        mb = {k: (f"{v / 2**20:.1f}" if v is not None else "n/a") for k, v in rss.items()}
        lines.append(
            f"server RSS MB: before {mb['before']}, after first interval "
            f"{mb['after_first_interval']}, end {mb['end']}, max {mb['max']}"
        )
    return "\n".join(lines)


def find_listening_pid(port: int) -> int | None:
    """The pid of the process listening on ``port`` on this machine, if psutil can tell."""
    try:
        connections = psutil.net_connections("tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return int(conn.pid) if conn.pid else None
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`: "))
    parser.add_argument(
        "--target",
        help="loopback host:port of a running service; without it a smartbin-serve is started",
    )
    parser.add_argument("--pid", type=int, help="server pid for memory figures (with --target)")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE_DIR, help="bundle to serve")
    parser.add_argument("--config", type=Path, help="smartbin-serve YAML config to serve with")
    parser.add_argument("--images", type=Path, default=SAMPLES_DIR, help="folder of photos")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight at once")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--report-every", type=float, default=10.0, help="seconds per line")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    add_tls_arguments(parser)
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION_SECONDS:
        parser.error(f"--duration must be in (0, {MAX_DURATION_SECONDS:.0f}] seconds")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--concurrency must be 1 to {MAX_CONCURRENCY}")
    if args.report_every <= 0 or args.timeout <= 0:
        parser.error("--report-every and --timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    service: ServiceProcess | None = None
    if args.target:
        try:
            require_loopback(args.target)
        except NotLoopbackError as err:
            sys.exit(f"smartbin-load: {err}")
        target = args.target
        pid = args.pid or find_listening_pid(int(target.rpartition(":")[2]))
    else:
        try:
            service = spawn_service(serve_args(args.bundle, args.config))
        except RuntimeError as err:
            sys.exit(f"smartbin-load: {err}")
        target, pid = service.target, service.process.pid
    try:
        channel = open_channel(target, args.ca, args.cert, args.key, args.server_name)
        settings = LoadSettings(
            target, args.concurrency, args.duration, args.report_every, args.timeout, args.top_k
        )
        with channel:
            summary = LoadRun(settings, channel, load_images(args.images), pid).run()
    finally:
        exit_code = service.stop() if service is not None else 0
    print(format_summary(summary))
    if service is not None:
        print(f"smartbin-serve exited with code {exit_code}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    sys.exit(1 if summary["errors"] or exit_code else 0)


if __name__ == "__main__":
    main()
