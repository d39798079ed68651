"""Quantization-aware fine-tuning: the model trains computing as its int8 twin will."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_checkpoint, tiny_train_args
from torch import nn

from converter.convert import calibration_images
from converter.tflite import calibration_frame
from smartbin.bundle import load_bundle
from smartbin.model import TFLiteClassifier, softmax
from smartbin.preprocessing import Preprocessing, prepare
from trainer.data import load_source, select
from trainer.model import build_from_checkpoint, create_classifier
from trainer.qat import attach_fake_quant, conv_norm_pairs, start_rounding
from trainer.train import parse_args, run


def test_fake_quantized_model_answers_as_the_int8_model_does(
    tiny_bundle: Path, tiny_data: Path
) -> None:
    checkpoint = torch.load(tiny_checkpoint(tiny_bundle), map_location="cpu", weights_only=True)
    spec = Preprocessing.from_dict(checkpoint["preprocessing"])
    images = [prepare(path.read_bytes(), spec) for path in sorted(tiny_data.rglob("*.jpg"))]
    inputs = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()

    # Ranges recorded on the very photos the converter calibrated on.
    train = select(load_source(str(tiny_data)), checkpoint["split"], "train")
    frames = np.concatenate([calibration_frame(p) for p in calibration_images(train, spec, 16, 0)])
    batch = (torch.from_numpy(frames).permute(0, 3, 1, 2), torch.zeros(len(frames)))

    float_model = build_from_checkpoint(checkpoint).eval()
    rounded = build_from_checkpoint(checkpoint)
    start_rounding(rounded, attach_fake_quant(rounded), [batch], torch.device("cpu"), 1)
    rounded.eval()
    with torch.no_grad():
        float_probs = float_model(inputs).softmax(1).numpy()
        rounded_probs = rounded(inputs).softmax(1).numpy()
    classifier = TFLiteClassifier(load_bundle(tiny_bundle))
    # The int8 model's own scores: the bundle's calibrated temperature left out, as it is from
    # the float and simulated ones.
    int8_probs = np.stack([softmax(classifier.logits(image)) for image in images])

    # The converter's int8 model is what the fine-tuning has to imitate: the simulation must
    # sit clearly closer to it than the float model does. A model trained from random weights on
    # a few dozen photos answers with small logits, where the rounding of single values weighs
    # more: on such models the simulation came to 0.5-0.75 of the float model's gap, against
    # 0.93 with only the weights rounded and over 1 with the activation ranges a third off.
    float_gap = np.abs(float_probs - int8_probs).mean()
    rounded_gap = np.abs(rounded_probs - int8_probs).mean()
    assert rounded_gap < 0.8 * float_gap, (rounded_gap, float_gap)


def test_weights_are_rounded_per_output_channel_with_batch_norm_folded_in() -> None:
    torch.manual_seed(0)
    model = create_classifier("mobilenetv2_100", 3, Preprocessing(input_size=64, resize_size=64))
    for norm in model.modules():
        if isinstance(norm, nn.BatchNorm2d):  # trained statistics, far from the initial ones
            norm.weight.data.uniform_(0.2, 2.0)
            norm.running_var.uniform_(0.05, 4.0)
    pairs = list(conv_norm_pairs(model))
    originals = [conv.weight.detach().clone() for conv, _ in pairs]
    attach_fake_quant(model)
    for (conv, norm), original in zip(pairs, originals, strict=True):
        gain = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).view(-1, 1, 1, 1)
        folded = (conv.weight * gain).detach()
        steps = folded.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
        levels = folded / steps
        assert torch.allclose(levels, levels.round(), atol=2e-3)
        assert not torch.equal(conv.weight, original)
    head = model.head().weight.detach()
    levels = head / (head.abs().amax(dim=1, keepdim=True) / 127)
    assert torch.allclose(levels, levels.round(), atol=2e-3)


def test_qat_run_saves_plain_weights_the_converter_loads(
    tiny_bundle: Path, tiny_data: Path, tmp_path: Path
) -> None:
    init = tiny_checkpoint(tiny_bundle)
    extra = ["--init", str(init), "--split", str(init.parent / "split.json")]
    argv = tiny_train_args(tiny_data, tmp_path, "qat", *extra, "--qat", "--ema-decay", "0")
    saved = torch.load(run(parse_args(argv)), map_location="cpu", weights_only=True)

    original = torch.load(init, map_location="cpu", weights_only=True)["state_dict"]
    assert saved["state_dict"].keys() == original.keys()
    assert any(not torch.equal(saved["state_dict"][k], original[k]) for k in original)
    build_from_checkpoint(saved)  # loads strictly, as the converter does


@pytest.mark.parametrize("missing", [[], ["--init", "x.pt"]], ids=["no-init", "with-ema"])
def test_qat_needs_a_trained_model_and_no_weight_averaging(
    tiny_data: Path, tmp_path: Path, missing: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(tiny_train_args(tiny_data, tmp_path, "qat", "--qat", *missing))
    assert "--qat fine-tunes a trained model" in capsys.readouterr().err


def test_a_start_of_another_architecture_or_size_is_refused(
    tiny_bundle: Path, tiny_data: Path, tmp_path: Path
) -> None:
    init = tiny_checkpoint(tiny_bundle)
    extra = ["--init", str(init), "--split", str(init.parent / "split.json"), "--img-size", "128"]
    argv = tiny_train_args(tiny_data, tmp_path, "qat", *extra, "--qat", "--ema-decay", "0")
    with pytest.raises(ValueError, match="at 96 px, this run trains .* at 128 px: pass --arch"):
        run(parse_args(argv))
