"""A fleet of simulated bins pushing to one central store, to measure what the store needs.

    python deploy/scale/simulate.py --bins 1000 --duration 300          # Prometheus
    python deploy/scale/simulate.py --bins 1000 --store victoriametrics # VictoriaMetrics

Each simulated bin sends exactly the series a real one does (``bin-page.prom``: the edge service,
its node exporter and its agent, ~450 series), relabelled with its own ``bin`` and with its
counters rising every scrape. The route, and why: a few local exporters serve all the bins' pages
(the bins split between them by ``--shards``) and ONE Prometheus agent scrapes them every
``--interval`` with ``honor_labels`` and remote-writes to the central store. The central store
receives the same series, the same samples per second and the same remote-write protocol as from a
thousand agents; only the number of connections differs (a handful instead of a thousand, each
sending larger batches), which matters little next to the per-sample cost of ingesting and storing.
A thousand real agents (each ~40 MB) would measure this machine, not the store.

The central store runs the shipped rules (deploy/prometheus/alerts.yml, host_alerts.yml) as in
production. After ``--duration`` seconds the script reads the store's series, ingestion rate and
memory, runs every query of the fleet dashboard (Grafana's variables filled in for "all bins")
as an instant and a range query, and prints the figures; ``--json`` writes them to a file.
Needs Debian's ``prometheus`` (and ``victoria-metrics`` for that store).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import yaml

logger = logging.getLogger("simulate")

HERE = Path(__file__).resolve().parent
DEPLOY = HERE.parent
PAGE = HERE / "bin-page.prom"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fleet.json"
RULE_FILES = (DEPLOY / "prometheus" / "alerts.yml", DEPLOY / "prometheus" / "host_alerts.yml")
# Series whose value only grows. Those the real bin had moved rise by one each scrape, so every
# rate() has something to show; those still at 0 (errors, refusals, dropped events) stay there,
# so the simulated fleet is a healthy one and raises no alert. Adding the same amount to every
# non-empty bucket of a histogram keeps its buckets cumulative.
COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")
BIN_LABEL = re.compile(r'bin="[^"]*"')
STARTUP_SECONDS = 120


@dataclass(frozen=True)
class Series:
    """One line of a bin's page: its name and labels with ``{bin}`` for the bin's name."""

    template: str
    value: float
    counter: bool


def read_page(path: Path) -> list[Series]:
    """The series of one bin, from a page in the Prometheus text format.

    Raises:
        ValueError: a line is not ``name{labels} value``, or carries no ``bin`` label.
    """
    series = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            name_and_labels, value = line.rsplit(" ", 1)
            number_value = float(value)
        except ValueError:
            raise ValueError(f"{path}:{number}: not 'name{{labels}} value': {line!r}") from None
        if not BIN_LABEL.search(name_and_labels):
            raise ValueError(f"{path}:{number}: no bin label in {name_and_labels!r}")
        template = BIN_LABEL.sub(
            'bin="{bin}"', name_and_labels.replace("{", "{{").replace("}", "}}")
        )
        name = name_and_labels.split("{", 1)[0]
        series.append(Series(template, number_value, name.endswith(COUNTER_SUFFIXES)))
    if not series:
        raise ValueError(f"{path} holds no series")
    return series


def bin_names(count: int) -> list[str]:
    return [f"sim-{number:05d}" for number in range(count)]


class BinPages:
    """The pages of some bins, their counters rising by one per ``interval`` of wall time."""

    def __init__(self, page: list[Series], bins: list[str], interval: float) -> None:
        self.interval = interval
        self.started = time.monotonic()
        self.names = [line.template.format(bin=name) for name in bins for line in page]
        self.values = [line.value for _ in bins for line in page]
        self.rises = [1.0 if line.counter and line.value else 0.0 for _ in bins for line in page]

    def render(self) -> bytes:
        steps = math.floor((time.monotonic() - self.started) / self.interval)
        lines = map(
            "{} {}".format,
            self.names,
            (value + rise * steps for value, rise in zip(self.values, self.rises, strict=True)),
        )
        return ("\n".join(lines) + "\n").encode()

    def __call__(self, environ: dict, start_response: Callable[..., object]) -> Iterable[bytes]:
        """The WSGI application: every request gets the page."""
        body = self.render()
        start_response(
            "200 OK",
            [("Content-Type", "text/plain; version=0.0.4"), ("Content-Length", str(len(body)))],
        )
        return [body]


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """One request per scrape: not worth a line each."""


@contextlib.contextmanager
def serve_pages(
    page: list[Series], bins: list[str], shards: int, interval: float
) -> Iterator[list[int]]:
    """Serve the bins' pages from ``shards`` local exporters; yields their ports."""
    servers: list[WSGIServer] = []
    size = math.ceil(len(bins) / shards)
    try:
        for start in range(0, len(bins), size):
            app = BinPages(page, bins[start : start + size], interval)
            server = make_server("127.0.0.1", 0, app, handler_class=QuietHandler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
        yield [server.server_port for server in servers]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary(name: str, package: str) -> str:
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: apt-get install {package}")
    return found


@dataclass
class Store:
    """The central store under test: its process, its API and its remote-write URL."""

    kind: str
    process: subprocess.Popen
    url: str
    write_url: str

    def query(self, path: str, **params: str) -> dict:
        url = f"{self.url}{path}?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=120) as reply:
                answer = json.load(reply)
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"{self.kind} refused {params}: {err.read().decode()}") from err
        if answer.get("status") != "success":
            raise RuntimeError(f"{self.kind} failed {params}: {answer}")
        return answer["data"]

    def value(self, expr: str) -> float:
        result = self.query("/api/v1/query", query=expr)["result"]
        return float(result[0]["value"][1]) if result else math.nan


def own_metric(url: str, name: str) -> float:
    """A sample of a process's own /metrics page (summed over its label sets); NaN if absent."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as reply:
        page = reply.read().decode()
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith((name + " ", name + "{"))
    ]
    return sum(values) if values else math.nan


def start_process(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)


def start_prometheus(work: Path, port: int) -> Store:
    """The central Prometheus as docker-compose.yml runs it: remote-write receiver, the rules."""
    rules = []
    for path in RULE_FILES:
        rules.append(str(work / path.name))
        shutil.copy(path, work / path.name)
    config = {"global": {"evaluation_interval": "1m"}, "rule_files": rules}
    (work / "central.yml").write_text(yaml.safe_dump(config))
    command = [
        binary("prometheus", "prometheus"),
        f"--config.file={work / 'central.yml'}",
        f"--storage.tsdb.path={work / 'central-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-remote-write-receiver",
    ]
    url = f"http://127.0.0.1:{port}"
    return Store(
        "prometheus", start_process(command, work / "central.log"), url, url + "/api/v1/write"
    )


def start_victoriametrics(work: Path, port: int) -> Store:
    """Single-node VictoriaMetrics (Debian's victoria-metrics): the same remote-write and query
    API as the cluster's vminsert and vmselect, without the tenant prefix."""
    command = [
        binary("victoria-metrics", "victoria-metrics"),
        f"-storageDataPath={work / 'vm-data'}",
        f"-httpListenAddr=127.0.0.1:{port}",
        "-retentionPeriod=1d",
        "-search.latencyOffset=0s",  # answer with the newest samples, as Prometheus does
        # Fleet-wide panels read up to 100 series per bin; the default limit is 300,000.
        "-search.maxUniqueTimeseries=10000000",
    ]
    url = f"http://127.0.0.1:{port}"
    return Store(
        "victoriametrics", start_process(command, work / "vm.log"), url, url + "/api/v1/write"
    )


def start_agent(
    work: Path, port: int, exporter_ports: list[int], interval: float, write_url: str
) -> subprocess.Popen:
    """One Prometheus agent scraping every simulated bin, keeping their labels."""
    seconds = f"{interval:g}s"
    config = {
        "global": {"scrape_interval": seconds, "scrape_timeout": f"{min(interval, 10):g}s"},
        "scrape_configs": [
            {
                "job_name": "simulated-bins",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in exporter_ports]}],
            }
        ],
        "remote_write": [{"url": write_url}],
    }
    (work / "agent.yml").write_text(yaml.safe_dump(config))
    command = [
        binary("prometheus", "prometheus"),
        "--enable-feature=agent",
        f"--config.file={work / 'agent.yml'}",
        f"--storage.agent.path={work / 'agent-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    return start_process(command, work / "agent.log")


def wait_until_ready(url: str, path: str, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}; see its log")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + path, timeout=2) as reply:
            if reply.status == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"{what} not ready after {STARTUP_SECONDS} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def dashboard_queries(bins: int, window: str) -> dict[str, list[str]]:
    """Every PromQL of the fleet dashboard, by panel, as Grafana sends it for all bins."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {
        "$__rate_interval": "1m",
        "$__interval": "15s",
        "$__range": window,
        "$bin": ".*",
    }
    queries: dict[str, list[str]] = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in variables.items():
                expr = expr.replace(variable, value)
            queries.setdefault(panel["title"], []).append(expr)
    return queries


@dataclass
class QueryTime:
    panel: str
    expr: str
    instant_seconds: float
    range_seconds: float
    result_series: int


def time_query(
    store: Store, panel: str, expr: str, start: float, end: float, repeat: int
) -> QueryTime:
    """The median of ``repeat`` runs of ``expr``, instant and over [start, end] at 15 s steps."""
    instant, ranged = [], []
    series = 0
    for _ in range(repeat):
        began = time.perf_counter()
        series = len(store.query("/api/v1/query", query=expr, time=f"{end:.3f}")["result"])
        instant.append(time.perf_counter() - began)
        began = time.perf_counter()
        store.query(
            "/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="15"
        )
        ranged.append(time.perf_counter() - began)
    return QueryTime(panel, expr, statistics.median(instant), statistics.median(ranged), series)


@dataclass
class Figures:
    """What the run measured."""

    store: str
    bins: int
    series_per_bin: int
    interval_seconds: float
    duration_seconds: float
    cpu: str
    repeat: int
    store_series: float = math.nan
    samples_per_second: float = math.nan
    store_rss_bytes: float = math.nan
    agent_samples_failed: float = math.nan
    agent_samples_pending: float = math.nan
    rule_evaluation_seconds: float = math.nan
    bytes_per_sample: float = math.nan  # remote write on the wire: protobuf, snappy-compressed
    load_average: float = math.nan  # the machine's 5-minute load when the run ended
    bins_seen: int = 0
    queries: list[QueryTime] = field(default_factory=list)


def cpu_name() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def ingestion(store: Store, interval: float) -> tuple[float, float]:
    """The store's series now, and the samples per second it stored over two scrape rounds."""
    if store.kind == "prometheus":
        series = own_metric(store.url, "prometheus_tsdb_head_series")
        appended = "prometheus_tsdb_head_samples_appended_total"
    else:
        series = store.value('count({__name__=~".+"})')
        appended = "vm_rows_inserted_total"
    first, began = own_metric(store.url, appended), time.monotonic()
    time.sleep(2 * interval)
    return series, (own_metric(store.url, appended) - first) / (time.monotonic() - began)


def rule_seconds(store: Store) -> float:
    """Time the store's last evaluation of all the shipped rule groups took (Prometheus)."""
    if store.kind != "prometheus":
        return math.nan
    return own_metric(store.url, "prometheus_rule_group_last_duration_seconds")


def measure(store: Store, agent_url: str, figures: Figures, started: float) -> None:
    figures.store_series, figures.samples_per_second = ingestion(store, figures.interval_seconds)
    figures.store_rss_bytes = own_metric(store.url, "process_resident_memory_bytes")
    figures.load_average = os.getloadavg()[1]
    figures.rule_evaluation_seconds = rule_seconds(store)
    failed = "prometheus_remote_storage_samples_failed_total"
    figures.agent_samples_failed = own_metric(agent_url, failed)
    figures.agent_samples_pending = own_metric(
        agent_url, "prometheus_remote_storage_samples_pending"
    )
    sent = own_metric(agent_url, "prometheus_remote_storage_samples_total")
    figures.bytes_per_sample = own_metric(agent_url, "prometheus_remote_storage_bytes_total") / sent
    bins = store.query("/api/v1/label/bin/values")
    figures.bins_seen = len([name for name in bins if name.startswith("sim-")])
    end = time.time()
    window = max(60, int(end - started))
    for panel, exprs in dashboard_queries(figures.bins, f"{window}s").items():
        for expr in exprs:
            if expr.startswith("label_values("):
                continue
            timed = time_query(store, panel, expr, end - window, end, figures.repeat)
            figures.queries.append(timed)


def run(args: argparse.Namespace, work: Path) -> Figures:
    page = read_page(args.page)
    bins = bin_names(args.bins)
    figures = Figures(
        args.store, args.bins, len(page), args.interval, args.duration, cpu_name(), args.repeat
    )
    store_port, agent_port = free_port(), free_port()
    start_store = start_prometheus if args.store == "prometheus" else start_victoriametrics
    store = start_store(work, store_port)
    processes = [store.process]
    try:
        ready_path = "/-/ready" if args.store == "prometheus" else "/health"
        wait_until_ready(store.url, ready_path, args.store, store.process)
        with serve_pages(page, bins, min(args.shards, args.bins), args.interval) as ports:
            agent = start_agent(work, agent_port, ports, args.interval, store.write_url)
            processes.append(agent)
            agent_url = f"http://127.0.0.1:{agent_port}"
            wait_until_ready(agent_url, "/-/ready", "the agent", agent)
            started = time.time()
            logger.info(
                "%d bins x %d series every %g s for %g s",
                args.bins,
                len(page),
                args.interval,
                args.duration,
            )
            time.sleep(args.duration)
            measure(store, agent_url, figures, started)
    finally:
        for process in reversed(processes):
            stop(process)
    return figures


def seconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f} s"


def table(figures: Figures) -> str:
    queries = figures.queries
    slowest = sorted(queries, key=lambda q: q.range_seconds, reverse=True)[:5]
    expected = figures.bins * figures.series_per_bin / figures.interval_seconds
    lines = [
        f"store: {figures.store}; CPU: {figures.cpu}; load average {figures.load_average:.1f}",
        f"{figures.bins} bins x {figures.series_per_bin} series, scraped every "
        f"{figures.interval_seconds:g} s for {figures.duration_seconds:g} s",
        "",
        "| figure | value |",
        "|---|---|",
        f"| bins seen by the store | {figures.bins_seen} |",
        f"| series in the store | {figures.store_series:,.0f} |",
        f"| samples/s ingested | {figures.samples_per_second:,.0f} (expected {expected:,.0f}) |",
        f"| store RSS | {figures.store_rss_bytes / 2**20:,.0f} MiB |",
        f"| one evaluation of all shipped rules | {seconds(figures.rule_evaluation_seconds)} |",
        f"| agent samples failed / pending | {figures.agent_samples_failed:,.0f} / "
        f"{figures.agent_samples_pending:,.0f} |",
        f"| remote-write bytes per sample | {figures.bytes_per_sample:.2f} |",
        f"| dashboard queries | {len(queries)} |",
        f"| all queries, instant (sum of medians) | "
        f"{sum(q.instant_seconds for q in queries):.2f} s |",
        f"| all queries, range (sum of medians) | {sum(q.range_seconds for q in queries):.2f} s |",
        f"| slowest query, range | {slowest[0].range_seconds:.3f} s ({slowest[0].panel}) |"
        if slowest
        else "| slowest query | - |",
        "",
        "| slowest panels (range query) | instant s | range s | series |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {q.panel} | {q.instant_seconds:.3f} | {q.range_seconds:.3f} | {q.result_series} |"
        for q in slowest
    ]
    return "\n".join(lines)


def interval_seconds(text: str) -> float:
    """``15``, ``15s`` or ``1m`` as seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m)?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds, like 15s or 1m")
    return float(match[1]) * (60 if match[2] == "m" else 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bins", type=int, default=1000, help="simulated bins (default 1000)")
    parser.add_argument(
        "--interval", type=interval_seconds, default=15.0, help="scrape interval (default 15s)"
    )
    parser.add_argument(
        "--duration", type=interval_seconds, default=300.0, help="how long to run (default 5m)"
    )
    parser.add_argument("--store", choices=("prometheus", "victoriametrics"), default="prometheus")
    parser.add_argument("--shards", type=int, default=8, help="exporters the bins are split across")
    parser.add_argument("--page", type=Path, default=PAGE, help="one bin's series (bin-page.prom)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each query; the median counts (default 3)"
    )
    parser.add_argument("--work", type=Path, help="data folders (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    if min(args.bins, args.shards, args.repeat) < 1:
        parser.error("--bins, --shards and --repeat must be at least 1")
    return args


def stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so the store and agent are stopped."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        try:
            figures = run(args, work)
        except ValueError as err:  # a page that is not one bin's series
            raise SystemExit(f"simulate.py: {err}") from None
    print(table(figures))
    if args.json:
        figures_dict = {**vars(figures), "queries": [vars(q) for q in figures.queries]}
        args.json.write_text(json.dumps(figures_dict, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
