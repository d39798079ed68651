"""``python -m trainer.soup``: the uniform average of models fine-tuned from one start (a model
soup, Wortsman et al., 2022), moved ``keep_base`` of the way back toward that start.

Fine-tuned from the same weights with different settings (which blocks learn, how many views,
how much distillation, where items lie), models stay in one basin of the loss, and their average
answers better than each of them, on TrashNet's own photos and off the white board alike
(docs/models.md). It costs nothing on the bin: the soup is one model of the same size.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.adapt import toward_base
from trainer.distill import load_checkpoint

logger = logging.getLogger(__name__)


def check_alike(first: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless the two state dicts share one parameterisation: the same tensor
    names and shapes (batch norm folded alike), so that they can be mixed tensor by tensor."""
    if other.keys() != first.keys():
        raise ValueError(f"the models differ in their tensors: {set(first) ^ set(other)}")
    for key, tensor in first.items():
        if other[key].shape != tensor.shape:
            raise ValueError(f"{key}: {tuple(tensor.shape)} against {tuple(other[key].shape)}")


def average(state_dicts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensor-by-tensor mean of ``state_dicts`` (integer buffers taken from the first).

    Raises:
        ValueError: they differ in their tensors' names or shapes.
    """
    first = state_dicts[0]
    for other in state_dicts[1:]:
        check_alike(first, other)
    soup = {}
    for key, tensor in first.items():
        if tensor.is_floating_point():
            stacked = torch.stack([s[key].float() for s in state_dicts])
            soup[key] = stacked.mean(0).to(tensor.dtype)
        else:
            soup[key] = tensor.clone()
    return soup


def soup(
    ingredients: Sequence[dict[str, Any]], start: dict[str, Any], keep_base: float
) -> dict[str, Any]:
    """The average of ``ingredients`` (checkpoints fine-tuned from ``start`` on its labels and
    split: :func:`trainer.distill.load_checkpoint` reads them so), moved ``keep_base`` back
    toward ``start``, as a checkpoint like the first ingredient.

    Raises:
        ValueError: an ingredient is another architecture than ``start``, or its tensors differ.
    """
    for checkpoint in ingredients:
        if checkpoint.get("arch") != start.get("arch"):
            raise ValueError(f"arch: {checkpoint.get('arch')} against {start.get('arch')}")
    mean = average([c["state_dict"] for c in ingredients])
    state = toward_base(mean, start["state_dict"], keep_base)
    return {**ingredients[0], "state_dict": state, "soup": {"ingredients": len(ingredients)}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("ingredients", type=Path, nargs="+", help="checkpoints to average")
    parser.add_argument("--start", type=Path, required=True, help="the model they started from")
    parser.add_argument("--keep-base", type=float, default=0.5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    start = torch.load(args.start, map_location="cpu", weights_only=True)
    fingerprint = start["split"]["fingerprint"]
    ingredients = [load_checkpoint(p, start["labels"], fingerprint) for p in args.ingredients]
    result = soup(ingredients, start, args.keep_base)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out)
    logger.info(
        "%s: %d models averaged, keep_base %g", args.out, len(args.ingredients), args.keep_base
    )


if __name__ == "__main__":
    main()
