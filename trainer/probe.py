"""``python -m trainer.probe``: the ImageNet-pretrained body, frozen, with a linear head trained
on its features of the training photos (a linear probe), in the recovered default's
parameterisation.

A model fine-tuned on TrashNet's one white board trades away some of what its pretrained
features knew; a frozen body keeps all of it. The probe is the pretrained end of a weight-space
interpolation toward a fine-tuned model (``python -m converter.robustness --interpolate-from``,
as in WiSE-FT). Interpolating two models only makes sense when their tensors mean the same
thing: the recovered default has every batch norm folded into the convolution before it
(:mod:`trainer.recover`), so the pretrained body is folded the same way here
(:func:`fold_batchnorm`) before the two are mixed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from smartbin.preprocessing import Preprocessing
from trainer.data import Sample, load_source, select
from trainer.evaluate import eval_tensor
from trainer.model import PixelClassifier, create_classifier
from trainer.recover import conv_bn_pairs

logger = logging.getLogger(__name__)

# Weight decays tried for the head; the one with the best val accuracy is kept.
DECAYS = (1e-4, 1e-3, 1e-2)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> None:
    """Fold every batch norm into the convolution before it and set the norm to the identity
    with the folded shift (mean 0, variance ``1 - eps``, scale 1), as the recovered default
    holds them; the model computes the same function in eval mode."""
    for conv, norm in conv_bn_pairs(model):
        if norm is None:
            continue
        assert norm.running_mean is not None and norm.running_var is not None
        gain = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        weight = cast(torch.Tensor, conv.weight)
        weight.mul_(gain.view(-1, *([1] * (weight.dim() - 1))))
        shift = norm.bias - norm.running_mean * gain
        bias = cast("torch.Tensor | None", getattr(conv, "bias", None))
        if bias is not None:
            shift = shift + bias * gain
            bias.zero_()
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0 - norm.eps)
        norm.weight.fill_(1.0)
        norm.bias.copy_(shift)


@torch.no_grad()
def features(model: PixelClassifier, samples: list[Sample], spec: Preprocessing) -> torch.Tensor:
    """The pooled features before the head, for photos prepared as the bin prepares them."""
    model.eval()
    backbone = cast(Any, model.backbone)
    rows = []
    for start in range(0, len(samples), 32):
        pixels, _ = eval_tensor(samples[start : start + 32], spec)
        normalised = (pixels - model.offset) * model.scale
        normalised = normalised.contiguous(memory_format=torch.channels_last)
        rows.append(backbone.forward_head(backbone.forward_features(normalised), pre_logits=True))
    return torch.cat(rows)


def fit_head(
    train: tuple[torch.Tensor, torch.Tensor], classes: int, decay: float, steps: int = 300
) -> nn.Linear:
    """A linear head by full-batch L-BFGS on cross-entropy with an L2 penalty."""
    x, y = train
    head = nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def probe(
    weights: Path, like: dict[str, Any], split: dict[str, Any], data: str
) -> tuple[dict[str, Any], dict[str, float]]:
    """The folded pretrained body with the best of the linear heads (chosen on val), as a
    checkpoint shaped like ``like``; and each decay's val accuracy."""
    spec = Preprocessing.from_dict(like["preprocessing"])
    model = create_classifier(like["arch"], len(like["labels"]), spec, weights)
    fold_batchnorm(model.backbone)
    model = model.to(memory_format=torch.channels_last)
    image_set = load_source(data)
    sides = {name: select(image_set, split, name) for name in ("train", "val")}
    started = time.time()
    feats = {name: features(model, samples, spec) for name, samples in sides.items()}
    labels = {name: torch.tensor([s.label for s in samples]) for name, samples in sides.items()}
    logger.info(
        "features of %d photos in %.0f s", sum(map(len, feats.values())), time.time() - started
    )
    scores, heads = {}, {}
    for decay in DECAYS:
        head = fit_head((feats["train"], labels["train"]), len(like["labels"]), decay)
        with torch.no_grad():
            accuracy = float((head(feats["val"]).argmax(1) == labels["val"]).float().mean())
        scores[f"{decay:g}"], heads[decay] = accuracy, head
        logger.info("head with weight decay %g: val %.4f", decay, accuracy)
    best = max(DECAYS, key=lambda d: scores[f"{d:g}"])
    model.head().load_state_dict(heads[best].state_dict())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint = {**like, "state_dict": state, "split": split, "data": data}
    checkpoint.pop("recovered_from", None)
    checkpoint["probe"] = {"weights": str(weights), "decay": best, "val_by_decay": scores}
    return checkpoint, scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="ImageNet state_dict")
    parser.add_argument(
        "--like", type=Path, required=True, help="checkpoint whose arch, labels, input to match"
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", type=Path, required=True, help="split.json of --like's split")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    like = torch.load(args.like, map_location="cpu", weights_only=True)
    split = json.loads(args.split.read_text())
    if like["split"]["fingerprint"] != split["fingerprint"]:
        parser.error(f"{args.like} is of split {like['split']['fingerprint']}, not {args.split}")
    checkpoint, scores = probe(args.weights, like, split, args.data)
    partial = args.out.with_suffix(".partial")
    torch.save(checkpoint, partial)
    partial.replace(args.out)
    print(json.dumps(scores))


if __name__ == "__main__":
    main()
