"""Evaluation shared by the trainer and the converter: the float model's answers on photos
prepared by the contract's preprocessing, and the metrics of any model's answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from smartbin.preprocessing import Preprocessing, prepare
from trainer.data import Sample


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """Weighted gap between confidence and accuracy over equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(confidence[in_bin].mean() - correct[in_bin].mean())
    return float(ece)


def classification_report(
    probs: np.ndarray, targets: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1, confusion matrix (rows: truth) and ECE."""
    predicted = probs.argmax(axis=1)
    n = len(classes)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (targets, predicted), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp = confusion[i, i]
        precision = tp / max(confusion[:, i].sum(), 1)
        recall = tp / max(confusion[i, :].sum(), 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(confusion[i, :].sum()),
        }
    return {
        "accuracy": float((predicted == targets).mean()),
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "ece": expected_calibration_error(probs, targets),
        "count": int(len(targets)),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def plot_confusion(report: dict[str, Any], classes: list[str], path: Path, title: str) -> None:
    """Save the confusion matrix as a PNG (skipped where matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    matrix = np.array(report["confusion"])
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(
            col,
            row,
            str(value),
            ha="center",
            va="center",
            color="white" if value > matrix.max() / 2 else "black",
        )
    ax.set_title(f"{title}: accuracy {report['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def eval_tensor(samples: list[Sample], spec: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation inputs through the edge runtime's own preprocessing (NCHW float 0..255)."""
    pixels = np.stack([prepare(s.data, spec) for s in samples])
    return (
        torch.from_numpy(pixels).permute(0, 3, 1, 2).float(),
        torch.tensor([s.label for s in samples]),
    )


@torch.no_grad()
def predict(
    model: nn.Module, inputs: torch.Tensor, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    """Softmax probabilities for a stack of eval inputs."""
    model.eval()
    out = [
        model(inputs[i : i + batch_size].to(device, memory_format=torch.channels_last))
        .float()
        .softmax(1)
        .cpu()
        for i in range(0, len(inputs), batch_size)
    ]
    return torch.cat(out).numpy()
