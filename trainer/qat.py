"""Quantization-aware fine-tuning: train a model while it computes as its int8 twin will.

The converter quantizes after training (ai-edge-quantizer): every convolution with its batch
norm folded in gets int8 weights, one scale per output channel, and every activation tensor one
int8 scale and zero point from calibration ranges. Here the model fakes exactly that rounding in
the forward pass, so a few epochs at a small learning rate move the weights to where rounding
costs least. The checkpoint keeps plain float weights: the converter's path is unchanged.

Batch norm runs on its running statistics throughout (``freeze_batchnorm``), so the folded
weight that is rounded here is the one the converter will round.
"""

from __future__ import annotations

import types
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from trainer import distributed
from trainer.model import PixelClassifier

# Symmetric int8 weights use -127..127 (the converter's recipe), activations -128..127.
WEIGHT_LEVELS = 127


def _per_channel(weight: torch.Tensor) -> torch.Tensor:
    """Round each output channel to int8 with its own symmetric scale (gradients pass through)."""
    dims = tuple(range(1, weight.dim()))
    scale = (weight.detach().abs().amax(dim=dims) / WEIGHT_LEVELS).clamp(min=1e-10)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(
        weight, scale, zero, 0, -WEIGHT_LEVELS, WEIGHT_LEVELS
    )


class FoldedWeight(nn.Module):
    """A convolution's weight as the int8 model holds it: scaled by its batch norm, rounded,
    then scaled back, so that conv followed by the frozen batch norm equals the folded int8 conv."""

    def __init__(self, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        self._norm = [norm]  # a list: the norm stays its block's child, not this one's

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        norm = self._norm[0]
        if norm.running_var is None:
            raise ValueError("quantization-aware training needs batch norm's running statistics")
        gain = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        gain = torch.where(gain.abs() < 1e-6, torch.full_like(gain, 1e-6), gain).view(-1, 1, 1, 1)
        return _per_channel(weight * gain) / gain


class PlainWeight(nn.Module):
    """A weight without batch norm (the classifier's), rounded per output channel."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _per_channel(weight)


class ActivationRange:
    """Forward hook rounding a module's output to int8 over a min/max range.

    The range is the one the converter's calibration computes, the mean over images of each
    image's min and max. It is recorded until ``enabled`` and then stays put, as calibrated
    ranges do in the int8 model; a ``fixed`` range is given instead of recorded.
    """

    def __init__(self, fixed: tuple[float, float] | None = None) -> None:
        self.low, self.high = fixed or (0.0, 0.0)
        self.fixed = fixed is not None
        self.images = 0
        self.enabled = False

    def __call__(self, module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            if not self.fixed:
                self._record(output.detach().flatten(1))
            return output
        scale = max((self.high - self.low) / 255, 1e-8)
        zero_point = round(-self.low / scale) - 128
        return torch.fake_quantize_per_tensor_affine(output, scale, zero_point, -128, 127)

    def _record(self, images: torch.Tensor) -> None:
        share = len(images) / (self.images + len(images))
        self.low += share * (float(images.amin(1).clamp(max=0).mean()) - self.low)
        self.high += share * (float(images.amax(1).clamp(min=0).mean()) - self.high)
        self.images += len(images)


def conv_norm_pairs(model: nn.Module) -> Iterable[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Each convolution with the batch norm that follows it in the same block (timm's
    MobileNet and EfficientNet families name them conv_* and bn*, in order)."""
    for block in model.modules():
        children = list(block.children())
        for i, child in enumerate(children):
            if isinstance(child, nn.Conv2d):
                norm = next((c for c in children[i + 1 :] if isinstance(c, nn.BatchNorm2d)), None)
                if norm is None:
                    raise ValueError(f"{type(block).__name__} has a convolution without batch norm")
                yield child, norm


def _rounded_outputs(model: PixelClassifier) -> Iterable[nn.Module]:
    """The modules whose outputs are int8 tensors in the converted model: every batch norm
    (with its activation), every residual sum, the pooled features and the logits. (The
    normalised input is one more, hooked on its way into the backbone.)"""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) or getattr(module, "has_skip", False):
            yield module
    yield model.backbone.get_submodule("global_pool")
    yield model.head()


def normalised_range(model: PixelClassifier) -> tuple[float, float]:
    """Where pixels 0 and 255 land after the model's normalisation, over all channels."""
    offset, scale = model.offset.flatten(), model.scale.flatten()
    ends = torch.stack([(0 - offset) * scale, (255 - offset) * scale])
    return float(ends.min()), float(ends.max())


def attach_fake_quant(model: PixelClassifier) -> list[ActivationRange]:
    """Make ``model`` compute as its int8 twin; returns the activation ranges, which record
    what passes until ``start_rounding`` fixes them."""
    for conv, norm in conv_norm_pairs(model):
        parametrize.register_parametrization(conv, "weight", FoldedWeight(norm))
    parametrize.register_parametrization(model.head(), "weight", PlainWeight())
    ranges = []
    for module in _rounded_outputs(model):
        hook = ActivationRange()
        module.register_forward_hook(hook)
        ranges.append(hook)
    # The normalised pixels the backbone takes are an int8 tensor too; the converter's
    # calibration frames each hold a 0 and a 255 pixel, so its range is that of 0..255.
    normalised = ActivationRange(fixed=normalised_range(model))
    model.backbone.register_forward_pre_hook(
        lambda module, args: (normalised(module, args, args[0]),)
    )
    ranges.append(normalised)
    freeze_batchnorm(model)
    return ranges


def start_rounding(
    model: nn.Module,
    ranges: list[ActivationRange],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    count: int = 8,
) -> None:
    """Record the activation ranges on ``count`` training batches, then round to them."""
    model.train()
    with torch.no_grad():
        for seen, (inputs, _) in enumerate(batches, start=1):
            model(inputs.to(device, memory_format=torch.channels_last))
            if seen == count:
                break
    for hook in ranges:
        hook.enabled = True


def pool_ranges(ranges: list[ActivationRange]) -> None:
    """Among several processes, make the ranges each recorded on its own batches those of all
    their batches (the means weighted by images), so that every process rounds alike; nothing
    in a single process."""
    recorded = [hook for hook in ranges if not hook.fixed]
    if not distributed.active() or not recorded:
        return
    sums = distributed.sum_across(
        [v for hook in recorded for v in (hook.low * hook.images, hook.high * hook.images)]
        + [float(hook.images) for hook in recorded]
    )
    images = sums[2 * len(recorded) :]
    for i, hook in enumerate(recorded):
        count = max(images[i], 1.0)
        hook.low, hook.high = sums[2 * i] / count, sums[2 * i + 1] / count
        hook.images = int(images[i])


def freeze_batchnorm(model: nn.Module) -> None:
    """Keep every batch norm on its running statistics, even when the model trains."""

    def stay_in_eval(norm: nn.Module, mode: bool = True) -> nn.Module:
        return nn.Module.train(norm, False)

    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.train = types.MethodType(stay_in_eval, module)  # type: ignore[method-assign]
            module.eval()


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The float weights under their usual names, as a model without fake quantization loads
    them (the converter rounds them itself)."""
    return {
        key.replace("parametrizations.weight.original", "weight"): value.detach().cpu().clone()
        for key, value in model.state_dict().items()
    }
