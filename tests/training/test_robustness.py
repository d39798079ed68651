"""Measuring float checkpoints off the white board (converter/robustness.py) and the linear probe's
folded batch norm (trainer/probe.py): mixes of two models, and the cache of shifted inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PHOTOS
from tiny import TINY_SIZE

from converter.robustness import CLEAN, cached_inputs, interpolate, measure
from converter.shift_suite import HARDER_SHIFTS
from smartbin.preprocessing import Preprocessing
from trainer.data import load_source
from trainer.model import create_classifier
from trainer.probe import fold_batchnorm

SPEC = Preprocessing(
    input_size=TINY_SIZE, resize_size=TINY_SIZE + 12, mean=(0.5,) * 3, std=(0.5,) * 3
)


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_classifier("tf_efficientnet_lite0", 6, SPEC).eval()


def test_folding_batch_norm_keeps_the_answers() -> None:
    model = tiny_model(0)
    with torch.no_grad():  # statistics a trained model would have, not the fresh 0 and 1
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    pixels = torch.rand(2, 3, TINY_SIZE, TINY_SIZE) * 255
    before = model(pixels)
    fold_batchnorm(model.backbone)
    torch.testing.assert_close(model(pixels), before, atol=1e-4, rtol=1e-4)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(float(m.running_mean.abs().max()) == 0 for m in norms)


def test_a_mix_runs_from_one_model_to_the_other() -> None:
    start, end = tiny_model(0).state_dict(), tiny_model(1).state_dict()
    assert all(torch.equal(v, start[k]) for k, v in interpolate(start, end, 0.0).items())
    assert all(torch.equal(v, end[k]) for k, v in interpolate(start, end, 1.0).items())
    half = interpolate(start, end, 0.5)
    key = "backbone.classifier.weight"
    torch.testing.assert_close(half[key], (start[key] + end[key]) / 2)


def test_models_of_other_shapes_are_not_mixed() -> None:
    start = tiny_model(0).state_dict()
    other = create_classifier("tf_efficientnet_lite0", 4, SPEC).state_dict()
    with pytest.raises(ValueError, match="classifier"):
        interpolate(start, other, 0.5)


def test_shifted_inputs_are_cached_whole_and_measured(tmp_path: Path) -> None:
    samples = load_source(str(PHOTOS)).samples[:3]
    first = cached_inputs(samples, SPEC, tmp_path)
    assert set(first) == {CLEAN, *HARDER_SHIFTS}
    assert first[CLEAN].shape == (3, TINY_SIZE, TINY_SIZE, 3)
    assert not list(tmp_path.rglob("*.partial*"))
    again = cached_inputs(samples, SPEC, tmp_path)  # read back, not made again
    assert all(np.array_equal(again[name], first[name]) for name in first)
    figures = measure(tiny_model(0), again, np.array([s.label for s in samples]))
    assert set(figures) == {CLEAN, "mean", *HARDER_SHIFTS}
    assert all(0.0 <= value <= 1.0 for value in figures.values())
