"""A bundle may carry its model in more than one build (``alternatives``); the bin times them as
it loads and serves the fastest. Bundles without alternatives load as before."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from helpers import DATA, local_config

from edge_service.const import SAMPLES_DIR
from edge_service.server import create_server
from smartbin import model as model_module
from smartbin.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleError,
    ModelFile,
    add_alternative,
    load_bundle,
    write_bundle,
)
from smartbin.model import CHOICE_MARGIN, TFLiteClassifier, _choose, _Loaded
from smartbin.preprocessing import prepare
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

FLOAT_TWIN = DATA / "default_float32.tflite"


@pytest.fixture
def both(default_bundle: Path, tmp_path: Path) -> Path:
    """The default bundle with its float32 twin as an alternative."""
    folder = tmp_path / "both"
    shutil.copytree(default_bundle, folder)
    float_metrics = json.loads((folder / MANIFEST_NAME).read_text())["metrics"]["float"]
    add_alternative(folder, FLOAT_TWIN.read_bytes(), "float32", float_metrics)
    return folder


def test_a_bundle_without_alternatives_is_written_and_read_as_before(
    default_bundle: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(default_bundle)
    assert bundle.models == (bundle.manifest.model,)
    assert "alternatives" not in json.loads((default_bundle / MANIFEST_NAME).read_text())
    written = write_bundle(
        tmp_path / "plain",
        bundle.model_path.read_bytes(),
        list(bundle.labels),
        bundle.preprocessing,
        "v1",
        "int8",
        bundle.architecture,
    )
    # Bins older than the field read what write_bundle writes: no "alternatives" key.
    assert "alternatives" not in json.loads((written.path / MANIFEST_NAME).read_text())
    assert written.manifest.alternatives == ()


def test_an_alternative_is_listed_with_its_own_accuracy_and_verified(both: Path) -> None:
    bundle = load_bundle(both)
    main, alternative = bundle.models
    assert (main.quantization, alternative.quantization) == ("int8", "float32")
    assert bundle.path_of(alternative).read_bytes() == FLOAT_TWIN.read_bytes()
    assert (
        alternative.metrics["test"]["accuracy"]
        == bundle.manifest.metrics["float"]["test"]["accuracy"]
    )
    # The bundle's own figures stay as they were: no accuracy claim moves.
    assert bundle.flat_metrics() == load_bundle(both).flat_metrics()
    bundle.path_of(alternative).write_bytes(b"not the model")
    with pytest.raises(BundleError, match="model_float32.tflite has sha256"):
        load_bundle(both)


def test_adding_an_alternative_removes_the_signature_it_no_longer_matches(
    default_bundle: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "signed"
    shutil.copytree(default_bundle, folder)
    (folder / SIGNATURE_NAME).write_text("{}")
    add_alternative(folder, FLOAT_TWIN.read_bytes(), "float32")
    assert not (folder / SIGNATURE_NAME).exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda alt, main: {**alt, "file": main["file"]}, "each model needs a file of its own"),
        (lambda alt, main: {**alt, "architecture": "mobilenetv2_100"}, "builds of the same"),
        (lambda alt, main: {**alt, "speed": "fast"}, "Extra inputs are not permitted"),
    ],
)
def test_a_malformed_alternative_is_refused_by_name(both: Path, change: Any, message: str) -> None:
    manifest_path = both / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["alternatives"] = [change(manifest["alternatives"][0], manifest["model"])]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(both)


def test_the_bin_times_each_model_and_serves_the_fastest(both: Path) -> None:
    bundle = load_bundle(both)
    started = time.perf_counter()
    classifier = TFLiteClassifier(bundle, num_threads=1)
    assert time.perf_counter() - started < 10
    assert [t.quantization for t in classifier.timings] == ["int8", "float32"]
    assert all(t.cpu_ms > 0 and not t.error for t in classifier.timings)
    assert classifier.model in bundle.models
    fastest = min(classifier.timings, key=lambda t: t.cpu_ms)
    main = classifier.timings[0]
    # The main model keeps serving unless an alternative beats it by the margin.
    expected = fastest.file if fastest.cpu_ms < main.cpu_ms * (1 - CHOICE_MARGIN) else main.file
    assert classifier.model.file == expected
    photo = (SAMPLES_DIR / "glass1.jpg").read_bytes()
    probabilities = classifier.probabilities(prepare(photo, bundle.preprocessing))
    assert classifier.rank(probabilities)[0].label == "glass"


class FakeInterpreter:
    """Invokes take ``seconds`` of CPU; ``fails`` makes them raise as a refusing runtime does."""

    def __init__(self, seconds: float, fails: bool = False) -> None:
        self.seconds = seconds
        self.fails = fails

    def get_input_details(self) -> list[dict[str, Any]]:
        return [{"index": 0, "shape": (1, 2, 2, 3), "dtype": np.int8}]

    def set_tensor(self, index: int, value: np.ndarray) -> None:
        pass

    def invoke(self) -> None:
        if self.fails:
            raise RuntimeError("Node number 5 (CONV_2D) failed to invoke")
        ends = time.process_time() + self.seconds  # CPU time, as a model's invoke takes
        while time.process_time() < ends:
            pass


def fake(name: str, quantization: Any, seconds: float, fails: bool = False) -> _Loaded:
    model = ModelFile(file=name, sha256="0" * 64, quantization=quantization)
    return _Loaded(model, b"", FakeInterpreter(seconds, fails))  # type: ignore[arg-type]


def test_an_alternative_serves_only_when_clearly_faster() -> None:
    chosen, timings = _choose([fake("a.tflite", "int8", 0.02), fake("b.tflite", "float32", 0.004)])
    assert chosen.model.file == "b.tflite"
    assert [t.file for t in timings] == ["a.tflite", "b.tflite"]
    chosen, _ = _choose([fake("a.tflite", "int8", 0.01), fake("b.tflite", "float32", 0.01)])
    assert chosen.model.file == "a.tflite"


def test_an_alternative_that_fails_to_run_is_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    chosen, timings = _choose(
        [fake("a.tflite", "int8", 0.01), fake("b.tflite", "float32", 0.001, fails=True)]
    )
    assert chosen.model.file == "a.tflite"
    assert "failed to invoke" in timings[1].error and np.isnan(timings[1].cpu_ms)
    assert "b.tflite skipped" in caplog.text


def test_an_alternative_the_interpreter_refuses_is_skipped(
    default_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "refused"
    shutil.copytree(default_bundle, folder)
    add_alternative(folder, b"TFL3 but not a model", "float32")
    classifier = TFLiteClassifier(load_bundle(folder), num_threads=1)
    assert classifier.model.quantization == "int8"
    assert classifier.timings[0].file == "model_float32.tflite"
    assert "not a model the TFLite interpreter can run" in classifier.timings[0].error
    assert "model_float32.tflite skipped" in caplog.text


def test_get_model_info_names_the_model_serving(
    both: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever this machine's timings, the float32 alternative is made the faster one here.
    real_choose = model_module._choose

    def float_wins(loaded: list[_Loaded]) -> Any:
        _, timings = real_choose(loaded)
        return loaded[1], timings

    monkeypatch.setattr(model_module, "_choose", float_wins)
    service = create_server(local_config(both))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            info = stub.GetModelInfo(classifier_pb2.GetModelInfoRequest(), timeout=10)
            reply = stub.Classify(
                classifier_pb2.ClassifyRequest(image=(SAMPLES_DIR / "glass1.jpg").read_bytes()),
                timeout=30,
            )
    finally:
        service.stop(grace=1)
    bundle = load_bundle(both)
    assert info.quantization == "float32"
    assert info.model_sha256 == bundle.models[1].sha256
    assert json.loads(info.manifest_json)["alternatives"][0]["file"] == "model_float32.tflite"
    assert info.metrics == pytest.approx(bundle.flat_metrics())
    assert reply.predictions[0].label == "glass"
