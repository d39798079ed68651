"""Fleet rollouts end to end: smartbin-fleet publishes to a real S3-compatible store (moto's
server on a free port), two real bins poll it over HTTP, the canary swaps first and the other
bin after the soak; a corrupt upload is refused, a canary whose unsure rate regresses rolls
back by itself and holds the rest, rollbacks need no download, and an HTTPS store with a
private CA is trusted only by the bins given that CA."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import grpc
import pytest
import yaml
from helpers import (
    PHOTOS,
    Authority,
    copy_bundle,
    free_port,
    local_config,
    metric,
    wait_for,
)
from moto.server import ThreadedMotoServer

from edge_service.const import DEFAULT_BUNDLE_DIR
from edge_service.server import RunningService, create_server
from smartbin.rollout import BinStatus
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc
from smartbin_tools import fleet
from smartbin_tools.service import serve_args, spawn_service

BUCKET = "fleet"
PREFIX = "site-a"
POLL = 0.2
SHIPPED = json.loads((DEFAULT_BUNDLE_DIR / "manifest.json").read_text())["version"]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A real S3-compatible server; bins read its prefix without credentials (bucket policy)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def store(endpoint: str, operator_credentials: None, request: Any) -> fleet.Store:
    """An empty bucket of its own for each test, readable by anyone under the prefix."""
    bucket = f"{BUCKET}-{request.node.name.replace('_', '-')[:40].lower().strip('-')}"
    return open_bucket(endpoint, bucket)


def open_bucket(endpoint: str, bucket: str) -> fleet.Store:
    """A new bucket whose prefix anyone may read (the bins hold no credentials)."""
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/{PREFIX}/*",
            }
        ],
    }
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    return fleet.Store.open(f"s3://{bucket}/{PREFIX}", endpoint)


@pytest.fixture
def operator_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "operator"),
        ("AWS_SECRET_ACCESS_KEY", "operator-secret"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)


def fleet_section(store: fleet.Store, bin_id: str, folder: Path, **rules: Any) -> dict[str, Any]:
    return {
        "store_url": store.bin_url(),
        "bin_id": bin_id,
        "bundles_dir": str(folder / bin_id),
        "poll_seconds": POLL,
        "timeout_seconds": 5,
        "regression": {"min_answers": 5, **rules},
    }


@pytest.fixture
def start_bin(store: fleet.Store, tmp_path: Path) -> Iterator[Callable[..., RunningService]]:
    """Start a bin in this process on the shipped bundle, taking rollouts from ``store``."""
    started: list[RunningService] = []

    def start(bin_id: str, **rules: Any) -> RunningService:
        config = local_config(
            DEFAULT_BUNDLE_DIR, fleet=fleet_section(store, bin_id, tmp_path, **rules)
        )
        started.append(create_server(config))
        return started[-1]

    yield start
    for running in started:
        running.stop(grace=1)


def model_info(target: str) -> classifier_pb2.ModelInfo:
    with grpc.insecure_channel(target) as channel:
        return classifier_pb2_grpc.ClassifierStub(channel).GetModelInfo(
            classifier_pb2.GetModelInfoRequest(), timeout=10
        )


def version(service: RunningService) -> str:
    return model_info(f"127.0.0.1:{service.port}").model_version


def status_of(store: fleet.Store, bin_id: str) -> BinStatus | None:
    return {status.bin: status for status in fleet.statuses(store)}.get(bin_id)


def state_of(store: fleet.Store, bin_id: str) -> str:
    status = status_of(store, bin_id)
    return status.state if status else "none"


def classify_photos(service: RunningService, count: int) -> list[bool]:
    """Classify ``count`` sample photos, a few of each category; whether each was unsure."""
    photos = sorted(PHOTOS.rglob("*.jpg"))[::3][:count]
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        return [
            stub.Classify(classifier_pb2.ClassifyRequest(image=p.read_bytes()), timeout=30).unsure
            for p in photos
        ]


def test_the_canary_swaps_first_and_the_other_bin_after_the_soak(
    store: fleet.Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two bins as separate smartbin-serve processes, configured from YAML files."""
    bins = {}
    for bin_id in ("bin-canary", "bin-2"):
        config = tmp_path / f"{bin_id}.yaml"
        config.write_text(yaml.safe_dump({"fleet": fleet_section(store, bin_id, tmp_path)}))
        bins[bin_id] = spawn_service(serve_args(DEFAULT_BUNDLE_DIR, config))
    canary, other = bins["bin-canary"], bins["bin-2"]
    try:
        bundle = copy_bundle(DEFAULT_BUNDLE_DIR, tmp_path / "site-v2", version="site-v2")
        rollout = fleet.publish(store, bundle, ["bin-canary"], ["bin-2"], 5.0, 3600)

        wait_for(lambda: model_info(canary.target).model_version == "site-v2", 20)
        assert model_info(other.target).model_version == SHIPPED
        wait_for(lambda: state_of(store, "bin-2") == "waiting", 10)

        wait_for(lambda: model_info(other.target).model_version == "site-v2", 30)
        assert time.time() >= rollout.soak_ends_at
        info = model_info(other.target)
        assert info.previous_model_version == SHIPPED
        wait_for(lambda: state_of(store, "bin-canary") == "serving", 10)
        wait_for(lambda: state_of(store, "bin-2") == "serving", 10)
        assert metric(other, 'smartbin_rollout_downloads_total{outcome="verified"}') == 1
        assert (tmp_path / "bin-2" / rollout.rollout_id / "model.tflite").is_file()

        fleet.main(
            [
                "status",
                "--store",
                f"s3://{store.bucket}/{PREFIX}",
                "--endpoint-url",
                store.client.meta.endpoint_url,
            ]
        )
        table = capsys.readouterr().out
        assert f"rollout {rollout.rollout_id}: site-v2, canary bin-canary" in table
        assert [line.split()[:3] for line in table.splitlines() if line.startswith("bin-")] == [
            ["bin-2", "-", "serving"],
            ["bin-canary", "canary", "serving"],
        ]
    finally:
        for service in bins.values():
            service.stop()


def test_a_corrupt_upload_is_refused_and_the_old_model_keeps_serving(
    store: fleet.Store, start_bin: Callable[..., RunningService], tmp_path: Path
) -> None:
    bundle = copy_bundle(DEFAULT_BUNDLE_DIR, tmp_path / "site-v2", version="site-v2")
    # Published, then its model replaced in the store by another of the same size; the bin
    # starts polling after that.
    rollout = fleet.publish(store, bundle, [], ["bin-1"], 0.0, 3600)
    model = (bundle / "model.tflite").read_bytes()
    store.write(f"bundles/{rollout.rollout_id}/model.tflite", model[:-1] + b"\0")
    bin_1 = start_bin("bin-1")

    wait_for(lambda: state_of(store, "bin-1") == "refused", 20)

    status = status_of(store, "bin-1")
    assert status is not None and "sha256" in status.reason and "corrupt" in status.reason
    assert version(bin_1) == SHIPPED
    assert metric(bin_1, 'smartbin_rollout_downloads_total{outcome="corrupt"}') == 1
    assert metric(bin_1, 'smartbin_rollout_state{smartbin_rollout_state="refused"}') == 1
    # Nothing half-written is left, and the bundle is not fetched again on the next polls.
    assert [p.name for p in (tmp_path / "bin-1").iterdir()] == ["state.json"]
    time.sleep(5 * POLL)
    assert metric(bin_1, 'smartbin_rollout_downloads_total{outcome="corrupt"}') == 1


def test_a_canary_whose_unsure_rate_regresses_rolls_back_and_holds_the_fleet(
    store: fleet.Store, start_bin: Callable[..., RunningService], tmp_path: Path
) -> None:
    canary, other = start_bin("bin-canary"), start_bin("bin-2")
    before = classify_photos(canary, 12)  # the shipped model's answers: the baseline
    assert sum(before) / len(before) < 0.8
    manifest = json.loads((DEFAULT_BUNDLE_DIR / "manifest.json").read_text())
    # A threshold no answer reaches: every answer of this bundle is unsure.
    calibration = {**manifest["calibration"], "unsure_below": 0.999}
    bundle = copy_bundle(
        DEFAULT_BUNDLE_DIR, tmp_path / "unsure", version="site-unsure", calibration=calibration
    )
    # A soak long enough for the canary to be judged first, on a busy machine too.
    rollout = fleet.publish(store, bundle, ["bin-canary"], ["bin-2"], 10.0, 3600)
    wait_for(lambda: version(canary) == "site-unsure", 20)

    classify_photos(canary, 12)

    wait_for(lambda: state_of(store, "bin-canary") == "rolled_back", 20)
    assert version(canary) == SHIPPED
    status = status_of(store, "bin-canary")
    assert status is not None and "unsure rate 100%" in status.reason
    assert status.baseline_unsure_rate == pytest.approx(sum(before) / len(before))
    assert metric(canary, 'smartbin_rollout_rollbacks_total{reason="regression"}') == 1
    # The other bin waits out the soak, then is held: it never swaps.
    wait_for(lambda: time.time() > rollout.soak_ends_at + 3 * POLL, 20)
    wait_for(lambda: state_of(store, "bin-2") == "held", 10)
    assert version(other) == SHIPPED
    # The rolled-back rollout is not taken again by the canary, and its status keeps the
    # figures of why over the later polls.
    time.sleep(5 * POLL)
    assert version(canary) == SHIPPED
    later = status_of(store, "bin-canary")
    assert later is not None and later.reason == status.reason
    assert later.baseline_unsure_rate == status.baseline_unsure_rate
    assert later.unsure_rate == pytest.approx(1.0)


def test_rollbacks_swap_back_without_a_download_and_stay_rolled_back(
    store: fleet.Store, start_bin: Callable[..., RunningService], tmp_path: Path
) -> None:
    bin_1 = start_bin("bin-1")
    v1 = copy_bundle(DEFAULT_BUNDLE_DIR, tmp_path / "v1", version="site-v1")
    v2 = copy_bundle(DEFAULT_BUNDLE_DIR, tmp_path / "v2", version="site-v2")
    fleet.publish(store, v1, [], ["bin-1"], 0.0, 3600)
    wait_for(lambda: version(bin_1) == "site-v1", 20)
    fleet.publish(store, v2, [], ["bin-1"], 0.0, 3600)
    wait_for(lambda: version(bin_1) == "site-v2", 20)
    downloads = 'smartbin_rollout_downloads_total{outcome="verified"}'
    assert metric(bin_1, downloads) == 2

    # The fleet goes back: the bundle before is published again, and the bin still has it.
    back = fleet.rollback(store, None, 3600)
    assert back.version == "site-v1"
    wait_for(lambda: version(bin_1) == "site-v1", 20)
    assert metric(bin_1, downloads) == 2
    assert metric(bin_1, 'smartbin_rollout_rollbacks_total{reason="fleet"}') == 1

    # One bin goes forward by hand, then back with RollbackModel: the poll does not undo it.
    with grpc.insecure_channel(f"127.0.0.1:{bin_1.admin_port}") as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        assert stub.RollbackModel(classifier_pb2.RollbackModelRequest()).model_version == (
            "site-v2"
        )
    wait_for(lambda: state_of(store, "bin-1") == "rolled_back", 10)
    time.sleep(5 * POLL)
    assert version(bin_1) == "site-v2"
    assert metric(bin_1, 'smartbin_rollout_rollbacks_total{reason="manual"}') == 1


def test_a_restarted_bin_serves_the_rolled_out_bundle(store: fleet.Store, tmp_path: Path) -> None:
    config = local_config(DEFAULT_BUNDLE_DIR, fleet=fleet_section(store, "bin-1", tmp_path))
    first = create_server(config)
    try:
        bundle = copy_bundle(DEFAULT_BUNDLE_DIR, tmp_path / "v2", version="site-v2")
        fleet.publish(store, bundle, [], [], 0.0, 3600)
        wait_for(lambda: version(first) == "site-v2", 20)
    finally:
        first.stop(grace=1)
    store.client.delete_object(Bucket=store.bucket, Key=store.key("rollout.json"))

    again = create_server(config)
    try:
        info = model_info(f"127.0.0.1:{again.port}")
        assert (info.model_version, info.previous_model_version) == ("site-v2", SHIPPED)
    finally:
        again.stop(grace=1)


def test_publish_refuses_a_folder_that_is_no_bundle(store: fleet.Store, tmp_path: Path) -> None:
    broken = copy_bundle(DEFAULT_BUNDLE_DIR, tmp_path / "broken", version="site-v2")
    (broken / "model.tflite").write_bytes(b"not a model")
    with pytest.raises(SystemExit) as failed:
        fleet.main(
            [
                "publish",
                str(broken),
                "--store",
                f"s3://{store.bucket}/{PREFIX}",
                "--endpoint-url",
                store.client.meta.endpoint_url,
            ]
        )
    assert "is not a bundle a bin would serve" in str(failed.value)
    assert "sha256" in str(failed.value)
    assert store.read("rollout.json") is None


@pytest.fixture
def https_endpoint(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """moto's server over HTTPS with a certificate from a private CA; with that CA's file."""
    authority = Authority(tmp_path, "fleet-ca")
    issued = authority.issue("store", server=True)
    port = free_port()
    command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1"]
    command += ["-p", str(port), "-c", str(issued.cert), "-k", str(issued.key)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"https://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=str(authority.cert_path))

    def up() -> bool:
        try:
            return bool(urllib.request.urlopen(f"{url}/moto-api/", context=context, timeout=1))
        except OSError:
            return False

    try:
        wait_for(up, 30)
        yield url, authority.cert_path
    finally:
        server.terminate()
        server.wait(10)


def test_a_bin_takes_rollouts_from_an_https_store_with_a_private_ca(
    https_endpoint: tuple[str, Path],
    operator_credentials: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    url, ca = https_endpoint
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))  # the operator's side trusts the CA too
    store = open_bucket(url, "fleet-https")
    trusting = create_server(
        local_config(
            DEFAULT_BUNDLE_DIR, fleet={**fleet_section(store, "bin-1", tmp_path), "ca": str(ca)}
        )
    )
    # A bin without the CA refuses the store's certificate and keeps its model.
    wary = create_server(
        local_config(DEFAULT_BUNDLE_DIR, fleet=fleet_section(store, "bin-2", tmp_path))
    )
    try:
        bundle = copy_bundle(DEFAULT_BUNDLE_DIR, tmp_path / "v2", version="site-v2")
        fleet.publish(store, bundle, [], [], 0.0, 3600)
        wait_for(lambda: version(trusting) == "site-v2", 20)
        wait_for(lambda: metric(wary, 'smartbin_rollout_polls_total{outcome="unreachable"}') >= 2)
        assert version(wary) == SHIPPED
    finally:
        trusting.stop(grace=1)
        wary.stop(grace=1)


def test_a_bin_keeps_the_newest_bundles_and_always_the_one_before(
    store: fleet.Store, tmp_path: Path
) -> None:
    section = {**fleet_section(store, "bin-1", tmp_path), "keep_bundles": 2}
    service = create_server(local_config(DEFAULT_BUNDLE_DIR, fleet=section))
    try:
        ids = []
        for name in ("v1", "v2", "v3"):
            bundle = copy_bundle(DEFAULT_BUNDLE_DIR, tmp_path / name, version=f"site-{name}")
            ids.append(fleet.publish(store, bundle, [], [], 0.0, 3600).rollout_id)
            wait_for(lambda name=name: version(service) == f"site-{name}", 20)
        kept = {ids[1], ids[2], "state.json"}
        wait_for(lambda: {p.name for p in (tmp_path / "bin-1").iterdir()} == kept, 10)
        with grpc.insecure_channel(f"127.0.0.1:{service.admin_port}") as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            back = stub.RollbackModel(classifier_pb2.RollbackModelRequest(), timeout=60)
        assert back.model_version == "site-v2"
    finally:
        service.stop(grace=1)
