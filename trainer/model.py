"""Build timm backbones that take 0..255 RGB pixels and normalise inside the model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol, cast

import timm
import torch
from torch import nn

from smartbin.preprocessing import Preprocessing

logger = logging.getLogger(__name__)


class TimmModel(Protocol):
    """What the trainer uses of a timm model beyond ``nn.Module``."""

    def get_classifier(self) -> nn.Module: ...

    def reset_classifier(self, num_classes: int) -> None: ...


class PixelClassifier(nn.Module):
    """A backbone preceded by its mean/std normalisation, fed NCHW float pixels in 0..255.

    Keeping normalisation in the model means the bundle's runtime preprocessing is only
    decode, resize and crop, and int8 input quantisation can use scale 1 on raw pixels.
    """

    offset: torch.Tensor
    scale: torch.Tensor

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("offset", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("scale", 1.0 / (torch.tensor(std).view(1, 3, 1, 1) * 255.0))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone((pixels - self.offset) * self.scale)

    def head(self) -> nn.Module:
        """The backbone's classification head: the layer trained anew for the task."""
        return cast(TimmModel, self.backbone).get_classifier()


def load_imagenet_weights(backbone: nn.Module, weights: Path) -> None:
    """Load an ImageNet state_dict whose keys follow another naming (torchvision, lukemelas).

    The supported files list the same tensors in the same order with the same shapes as timm's
    model, so keys are matched by position and every shape is checked (see the weights' SOURCE.md).
    """
    source = torch.load(weights, map_location="cpu", weights_only=True)
    target = backbone.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{weights} has {len(source)} tensors, the model expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"{weights}: {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor.to(expected.dtype)  # half-precision copies load too
    backbone.load_state_dict(mapped, strict=True)


def default_preprocessing(arch: str, input_size: int | None = None) -> Preprocessing:
    """timm's input size, crop ratio and mean/std for ``arch``; bilinear resizing."""
    config = timm.data.resolve_data_config({}, model=timm.create_model(arch, pretrained=False))
    size = input_size or int(config["input_size"][-1])
    return Preprocessing(
        input_size=size,
        resize_size=int(size / config["crop_pct"]),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
    )


def create_classifier(
    arch: str,
    num_classes: int,
    preprocessing: Preprocessing,
    weights: Path | None = None,
    hub_pretrained: bool = False,
) -> PixelClassifier:
    """A timm ``arch`` with a fresh ``num_classes`` head, initialised from ImageNet weights."""
    backbone = timm.create_model(arch, pretrained=hub_pretrained and weights is None)
    if weights is not None:
        load_imagenet_weights(backbone, weights)
    cast(TimmModel, backbone).reset_classifier(num_classes)
    return PixelClassifier(backbone, preprocessing.mean, preprocessing.std)


def build_from_checkpoint(checkpoint: dict[str, Any]) -> PixelClassifier:
    """Rebuild the trained model recorded in a checkpoint dict."""
    preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])
    model = create_classifier(checkpoint["arch"], len(checkpoint["labels"]), preprocessing)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
