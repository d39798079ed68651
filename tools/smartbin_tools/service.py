"""The one way the tools (and the tests) start ``smartbin-serve``: a child process on free
loopback ports, ready when it logs that it serves, stopped with SIGTERM.

The service binds port 0 for gRPC and for /metrics and names the ports it got in its "serving"
line, logged at INFO once grpc health says SERVING; so no port is picked here (and raced for),
and no health polling is needed. Leave ``--log-level`` at INFO (the default): above it, the line
never comes. The service logs nothing at INFO per call, so INFO costs nothing under load.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import TracebackType

import psutil

_SERVING_LINE = re.compile(r"on gRPC port (\d+) .*metrics on port (\d+)")


@dataclass
class ServiceProcess:
    """A ``smartbin-serve`` child process on loopback, its ports and its log lines.

    ``start_seconds`` is the time from starting the process to its "serving" line, that is to
    SERVING. Use it as a context manager to stop it on the way out.
    """

    process: subprocess.Popen[str]
    port: int
    metrics_port: int
    log: list[str] = field(default_factory=list)
    start_seconds: float = float("nan")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @cached_property
    def psutil_process(self) -> psutil.Process:
        """The child as psutil sees it: resident memory, CPU times."""
        return psutil.Process(self.process.pid)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the exit, return the exit code (kill if it does not come)."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve_args(bundle: Path, config: Path | None = None) -> list[str]:
    """``smartbin-serve`` arguments to serve ``bundle``, with the settings in ``config``."""
    return ["--bundle", str(bundle), *(["--config", str(config)] if config else [])]


def spawn_service(
    extra_args: list[str],
    start_timeout: float = 60.0,
    python: str = sys.executable,
    cwd: Path | None = None,
) -> ServiceProcess:
    """Start ``smartbin-serve`` on free loopback ports and wait until it says it serves.

    Args:
        extra_args: further command-line arguments (``--bundle``, ``--config``...).
        start_timeout: seconds to wait for the "serving" log line.
        python: interpreter to run it with.
        cwd: folder to start it in (default: this process's).

    Raises:
        RuntimeError: the service exited or did not start in time; the message holds its log.
    """
    command = [python, "-m", "edge_service.server", "--host", "127.0.0.1", "--port", "0"]
    command += ["--metrics-port", "0", *extra_args]
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=cwd
    )
    log: list[str] = []
    serving: list[tuple[int, int, float]] = []
    done = threading.Event()
    reader = threading.Thread(
        target=_read_log, args=(process, log, serving, done), name="serve-log", daemon=True
    )
    reader.start()
    if not done.wait(start_timeout) or not serving:
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(5)  # the last lines, for the message
        raise RuntimeError("smartbin-serve did not start:\n" + "\n".join(log))
    port, metrics_port, serving_at = serving[0]
    return ServiceProcess(process, port, metrics_port, log, serving_at - started)


def _read_log(
    process: subprocess.Popen[str],
    log: list[str],
    serving: list[tuple[int, int, float]],
    done: threading.Event,
) -> None:
    """Collect the child's log lines; on the "serving" line (or the end of the log) set
    ``done``, the ports and the time it came in ``serving``."""
    assert process.stderr is not None
    for line in process.stderr:
        log.append(line.rstrip("\n"))
        match = _SERVING_LINE.search(line)
        if match and not serving:
            serving.append((int(match.group(1)), int(match.group(2)), time.perf_counter()))
            done.set()
    done.set()
