"""The shipped default's float weights, rebuilt from its float32 twin, are that model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PHOTOS

from smartbin.bundle import load_bundle
from smartbin.model import TFLiteClassifier
from smartbin.preprocessing import Preprocessing, prepare
from trainer import recover
from trainer.model import build_from_checkpoint


@pytest.fixture(scope="module")
def recovered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("recover") / "default.pt"
    recover.write_default_checkpoint(path)
    loaded: dict = torch.load(path, map_location="cpu", weights_only=True)
    return loaded


def photos() -> list[Path]:
    """Two photos of each category the repository ships."""
    return [
        p
        for folder in sorted(PHOTOS.iterdir())
        if folder.is_dir()
        for p in sorted(folder.glob("*.jpg"))[:2]
    ]


def twin_logits(pixels: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(recover.DEFAULT_FLOAT_TWIN))
    interpreter.allocate_tensors()
    interpreter.set_tensor(
        interpreter.get_input_details()[0]["index"], pixels[None].astype(np.float32)
    )
    interpreter.invoke()
    return np.array(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0])


def test_recovered_model_gives_the_float_twins_answers(recovered: dict) -> None:
    model = build_from_checkpoint(recovered)
    spec = Preprocessing.from_dict(recovered["preprocessing"])
    for path in photos():
        pixels = prepare(path.read_bytes(), spec)
        with torch.no_grad():
            logits = model(torch.from_numpy(pixels.copy()[None]).permute(0, 3, 1, 2).float())[0]
        expected = twin_logits(pixels)
        np.testing.assert_allclose(logits.numpy(), expected, atol=1e-4, err_msg=str(path))
        np.testing.assert_allclose(
            logits.softmax(0).numpy(), torch.from_numpy(expected).softmax(0).numpy(), atol=1e-5
        )


def test_recovered_model_agrees_with_the_shipped_int8_bundle(recovered: dict) -> None:
    """The int8 bundle was quantized from this model: their top answers match on the photos."""
    model = build_from_checkpoint(recovered)
    classifier = TFLiteClassifier(load_bundle(recover.DEFAULT_BUNDLE))
    spec = classifier.bundle.preprocessing
    agree = []
    for path in photos():
        pixels = prepare(path.read_bytes(), spec)
        with torch.no_grad():
            logits = model(torch.from_numpy(pixels.copy()[None]).permute(0, 3, 1, 2).float())[0]
        agree.append(int(logits.argmax()) == int(classifier.probabilities(pixels).argmax()))
    assert np.mean(agree) >= 0.9


def test_checkpoint_carries_the_bundles_labels_and_recorded_digests(recovered: dict) -> None:
    manifest = load_bundle(recover.DEFAULT_BUNDLE).manifest
    assert recovered["labels"] == list(manifest.labels)
    assert recovered["arch"] == manifest.model.architecture
    assert recovered["recovered_from"]["float_twin_sha256"] == recover.FLOAT_TWIN_SHA256
    assert recover.state_dict_sha256(recovered["state_dict"]) == recover.RECOVERED_STATE_SHA256
    # BatchNorm was folded into the convolutions: every one is the identity plus a shift.
    norms = [
        m for m in build_from_checkpoint(recovered).modules() if isinstance(m, torch.nn.BatchNorm2d)
    ]
    assert norms and all(float(n.running_mean.abs().max()) == 0.0 for n in norms)  # type: ignore[union-attr]


def test_cached_checkpoint_is_reused_and_a_changed_one_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMARTBIN_CACHE", str(tmp_path))
    path = recover.default_checkpoint()
    assert path.parent == tmp_path and not path.with_suffix(".partial").exists()
    built = path.stat().st_mtime_ns
    assert recover.default_checkpoint() == path and path.stat().st_mtime_ns == built
    tampered = torch.load(path, map_location="cpu", weights_only=True)
    tampered["state_dict"]["backbone.classifier.bias"] += 1.0
    torch.save(tampered, path)
    recover.default_checkpoint()
    again = torch.load(path, map_location="cpu", weights_only=True)
    assert recover.state_dict_sha256(again["state_dict"]) == recover.RECOVERED_STATE_SHA256


def test_a_changed_twin_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    changed = tmp_path / "twin.tflite"
    data = bytearray(recover.DEFAULT_FLOAT_TWIN.read_bytes())
    data[-1] ^= 1
    changed.write_bytes(bytes(data))
    monkeypatch.setattr(recover, "DEFAULT_FLOAT_TWIN", changed)
    out = tmp_path / "out.pt"
    with pytest.raises(ValueError, match="expected " + recover.FLOAT_TWIN_SHA256):
        recover.write_default_checkpoint(out)
    assert not out.exists()
