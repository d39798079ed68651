"""A fresh bin exports every labelled counter at 0, so a dashboard shows zeros instead of
"No data" and Prometheus's increase() counts the first event of each kind (a series that first
appears at 1 is read as having always been 1)."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
from helpers import ROOT, copy_bundle, scrape
from prometheus_client.parser import text_string_to_metric_families

from edge_service.metrics import (
    REFUSAL_REASONS,
    RELOAD_OUTCOMES,
    RPC_METHODS,
    SERVED_CODES,
    STAGES,
    TRIGGER_OUTCOMES,
    TRIGGER_SOURCES,
)
from edge_service.server import RunningService
from smartbin.bundle import Bundle
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc


def samples(service: RunningService, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called ``name`` on the service's /metrics, by its sorted labels."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(scrape(service))
        for sample in family.samples
        if sample.name == name
    }


def at_zero(found: dict[tuple[tuple[str, str], ...], float], **labels: str) -> bool:
    return found.get(tuple(sorted(labels.items()))) == 0.0


def test_a_fresh_bin_exports_every_label_at_zero(
    service: RunningService, default_loaded: Bundle
) -> None:
    answers = samples(service, "smartbin_classifications_total")
    assert all(at_zero(answers, label=label) for label in default_loaded.labels), answers
    requests = samples(service, "smartbin_requests_total")
    refusals = samples(service, "smartbin_refusals_total")
    for method in RPC_METHODS:
        assert all(at_zero(requests, method=method, code=code) for code in SERVED_CODES), method
        for reason in REFUSAL_REASONS:
            assert at_zero(refusals, method=method, reason=reason), (method, reason)
    stages = samples(service, "smartbin_stage_seconds_count")
    assert all(at_zero(stages, stage=stage) for stage in STAGES), stages
    triggers = samples(service, "smartbin_triggers_total")
    for source in TRIGGER_SOURCES:
        for outcome in TRIGGER_OUTCOMES:
            assert at_zero(triggers, source=source, outcome=outcome), (source, outcome)
    reloads = samples(service, "smartbin_model_reloads_total")
    assert all(at_zero(reloads, outcome=outcome) for outcome in RELOAD_OUTCOMES), reloads


def test_a_label_a_new_model_adds_appears_at_zero(
    service: RunningService,
    admin_channel: grpc.Channel,
    default_bundle: Path,
    default_loaded: Bundle,
    tmp_path: Path,
) -> None:
    labels = [*default_loaded.labels[:-1], "newly-sorted"]
    relabelled = copy_bundle(default_bundle, tmp_path / "relabelled", labels=labels)
    admin = classifier_pb2_grpc.ClassifierStub(admin_channel)
    admin.ReloadModel(classifier_pb2.ReloadModelRequest(bundle_path=str(relabelled)), timeout=30)
    answers = samples(service, "smartbin_classifications_total")
    assert at_zero(answers, label="newly-sorted")
    # The label the old model had keeps its series: counters never go back.
    assert at_zero(answers, label=default_loaded.labels[-1])


def test_every_refusal_reason_the_service_counts_starts_at_zero() -> None:
    """The reasons counted in the code are the ones created at 0 (a new one must be added)."""
    source = "\n".join(path.read_text() for path in (ROOT / "edge_service").glob("*.py"))
    counted = set(re.findall(r'_refused\(\s*\w+,\s*"(\w+)"', source))
    counted |= set(re.findall(r'refusals\.labels\(\s*[^,]+,\s*"(\w+)"\)', source))
    assert counted, "no refusal found: the patterns above are out of date"
    assert counted <= set(REFUSAL_REASONS)
