"""The one way the tools (and the tests) start ``smartbin-serve``: a child process on free
loopback ports, ready when it logs that it serves, stopped with SIGTERM."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

_SERVING_LINE = re.compile(r"on gRPC port (\d+) .*metrics on port (\d+)")


@dataclass
class ServiceProcess:
    """A ``smartbin-serve`` child process on loopback, its ports and its log lines."""

    process: subprocess.Popen[str]
    port: int
    metrics_port: int
    log: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the exit, return the exit code (kill if it does not come)."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


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
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=cwd
    )
    assert process.stderr is not None
    log: list[str] = []
    found: list[tuple[int, int]] = []
    started = threading.Event()

    def read_log() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line.rstrip("\n"))
            match = _SERVING_LINE.search(line)
            if match and not found:
                found.append((int(match.group(1)), int(match.group(2))))
                started.set()
        started.set()

    threading.Thread(target=read_log, name="serve-log", daemon=True).start()
    if not started.wait(start_timeout) or not found:
        if process.poll() is None:
            process.kill()
        process.wait()
        raise RuntimeError("smartbin-serve did not start:\n" + "\n".join(log))
    port, metrics_port = found[0]
    return ServiceProcess(process, port, metrics_port, log)
