"""Knowledge distillation: a model learns the averaged answers of trained models (its teachers).

An ensemble of two fine-tuned models is more accurate than either, but twice the size and time
on a bin. Distillation moves much of that gain into one model of the shipped size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model import build_from_checkpoint


def load_checkpoint(path: Path, labels: list[str], fingerprint: str) -> dict[str, Any]:
    """A checkpoint trained on the same classes and the same split as this run.

    A model trained on another split has seen this run's val or test photos: learning from it,
    or starting from it, would leak them into the figures.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint["labels"] != labels:
        raise ValueError(f"{path} has labels {checkpoint['labels']}, this run {labels}")
    if checkpoint["split"]["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} was trained on split {checkpoint['split']['fingerprint']}, this run uses "
            f"{fingerprint}: pass that run's split.json with --split"
        )
    return checkpoint


class Teachers(nn.Module):
    """Trained models whose softened probabilities are averaged; each sees its own input size."""

    def __init__(self, checkpoints: list[dict[str, Any]]) -> None:
        super().__init__()
        self.models = nn.ModuleList(build_from_checkpoint(c) for c in checkpoints)
        self.sizes = [int(c["preprocessing"]["input_size"]) for c in checkpoints]
        self.requires_grad_(False)

    @torch.no_grad()
    def probabilities(self, pixels: torch.Tensor, temperature: float) -> torch.Tensor:
        self.eval()
        total = torch.zeros(())
        for model, size in zip(self.models, self.sizes, strict=True):
            inputs = pixels
            if pixels.shape[-1] != size:
                inputs = F.interpolate(
                    pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False
                )
            total = total + (model(inputs).float() / temperature).softmax(1)
        return total / len(self.models)


def distillation_loss(
    logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL divergence from the teachers' softened answers, scaled by T² so that its gradients
    keep the size of the label loss's whatever the temperature (Hinton et al., 2015)."""
    log_probs = (logits.float() / temperature).log_softmax(1)
    return F.kl_div(log_probs, teacher_probs, reduction="batchmean") * temperature**2
