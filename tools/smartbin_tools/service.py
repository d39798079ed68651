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
    child = spawn_child(command, _SERVING_LINE, "smartbin-serve", start_timeout, cwd)
    port, metrics_port = (int(group) for group in child.match.groups())
    return ServiceProcess(child.process, port, metrics_port, child.log, child.start_seconds)


@dataclass
class Child:
    """A child process that said it is ready: the log line's match and when it came."""

    process: subprocess.Popen[str]
    match: re.Match[str]
    log: list[str]
    start_seconds: float


def spawn_child(
    command: list[str],
    ready: re.Pattern[str],
    name: str,
    start_timeout: float = 60.0,
    cwd: Path | None = None,
) -> Child:
    """Start ``command`` and wait for a line of its stderr to match ``ready``; its stderr is
    collected in ``log`` from then on too.

    Raises:
        RuntimeError: the process exited or did not get ready in time; the message holds its
            log.
    """
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=cwd
    )
    log: list[str] = []
    found: list[tuple[re.Match[str], float]] = []
    done = threading.Event()
    reader = threading.Thread(
        target=_read_log, args=(process, ready, log, found, done), name=f"{name}-log", daemon=True
    )
    reader.start()
    if not done.wait(start_timeout) or not found:
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(5)  # the last lines, for the message
        raise RuntimeError(f"{name} did not start:\n" + "\n".join(log))
    match, ready_at = found[0]
    return Child(process, match, log, ready_at - started)


def _read_log(
    process: subprocess.Popen[str],
    ready: re.Pattern[str],
    log: list[str],
    found: list[tuple[re.Match[str], float]],
    done: threading.Event,
) -> None:
    """Collect the child's log lines; on the first line matching ``ready`` (or the end of the
    log) set ``done``, and the match and the time it came in ``found``."""
    assert process.stderr is not None
    for line in process.stderr:
        log.append(line.rstrip("\n"))
        match = ready.search(line)
        if match and not found:
            found.append((match, time.perf_counter()))
            done.set()
    done.set()
