"""``smartbin-recover``: the shipped default's float PyTorch weights, rebuilt from its float32 twin.

The default bundle's training checkpoint is lost; its float32 TFLite twin (the model the int8
bundle was quantized from, ``tests/data/default_float32.tflite``) is not. The converter exported
that twin from timm's model with every BatchNorm folded into the convolution before it, so each
convolution of the twin holds ``weight * gamma / sqrt(var + eps)`` and a bias, in the order the
model runs them. Walking the twin's convolutions in execution order and timm's in forward order
pairs them one to one; each BatchNorm is then set to the identity (mean 0, variance ``1 - eps``,
scale 1) with the folded bias as its shift. The rebuilt model gives the twin's logits to float
rounding (``tests/training/test_recover.py``).

A folded BatchNorm has no batch statistics left to learn from, which is why adapting this model
keeps every BatchNorm in eval mode (frozen statistics): a few dozen photos could not estimate
them anyway.

The rebuilt state dict is checked against :data:`RECOVERED_STATE_SHA256`, so a rebuild on
another machine is the same model, bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from smartbin.bundle import load_bundle
from trainer.model import PixelClassifier, create_classifier

logger = logging.getLogger(__name__)

# The repository's default bundle and its float32 twin (an editable install or a checkout).
REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPOSITORY / "edge_service" / "default_bundle"
DEFAULT_FLOAT_TWIN = REPOSITORY / "tests" / "data" / "default_float32.tflite"
FLOAT_TWIN_SHA256 = "9cc49f9fb2fda293ae8e040791551d1f891daf703ebc9e8669604a5fc427afa0"
# sha256 of the rebuilt state dict (state_dict_sha256), from the twin above.
RECOVERED_STATE_SHA256 = "1873a8767f1dd35923dea1a5437446f082b860c5deab59e78892baa9bbed6e32"
CHECKPOINT_NAME = "default_recovered.pt"

# TFLite kernels, (out, kh, kw, in) and depthwise (1, kh, kw, channels), to PyTorch's layout.
_CONV_LAYOUT = (0, 3, 1, 2)
_DEPTHWISE_LAYOUT = (3, 0, 1, 2)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """A digest of a state dict's names, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def twin_layers(twin: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(op, kernel, bias)`` of every CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED of a
    float TFLite model, in execution order, kernels in PyTorch's layout."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=str(twin),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    layers = []
    for op in interpreter._get_ops_details():
        name = op["op_name"]
        if name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        _, kernel_index, bias_index = (int(i) for i in op["inputs"][:3])
        kernel = np.array(interpreter.get_tensor(kernel_index), dtype=np.float32)
        bias = np.array(interpreter.get_tensor(bias_index), dtype=np.float32)
        if name == "CONV_2D":
            kernel = kernel.transpose(_CONV_LAYOUT)
        elif name == "DEPTHWISE_CONV_2D":
            kernel = kernel.transpose(_DEPTHWISE_LAYOUT)
        layers.append((name, np.ascontiguousarray(kernel), bias))
    return layers


def conv_bn_pairs(backbone: nn.Module) -> list[tuple[nn.Module, nn.BatchNorm2d | None]]:
    """Each convolution of ``backbone`` with the BatchNorm that follows it, in forward order,
    and the classifier last (with no BatchNorm)."""
    pairs: list[tuple[nn.Module, nn.BatchNorm2d | None]] = []
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            pairs.append((module, None))
        elif isinstance(module, nn.BatchNorm2d):
            if not pairs or pairs[-1][1] is not None:
                raise ValueError("a BatchNorm without a convolution before it")
            pairs[-1] = (pairs[-1][0], module)
        elif isinstance(module, nn.Linear):
            pairs.append((module, None))
    return pairs


def load_folded(model: PixelClassifier, layers: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Copy the twin's folded kernels and biases into ``model``, BatchNorms as the identity."""
    pairs = conv_bn_pairs(model.backbone)
    if len(pairs) != len(layers):
        raise ValueError(
            f"the float twin has {len(layers)} convolution and dense layers, "
            f"the model {len(pairs)}: is it the same architecture?"
        )
    with torch.no_grad():
        for index, ((module, norm), (op, kernel, bias)) in enumerate(
            zip(pairs, layers, strict=True)
        ):
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            if tuple(weight.shape) != kernel.shape:
                raise ValueError(
                    f"layer {index} ({op}): twin kernel {kernel.shape} does not fit "
                    f"{tuple(weight.shape)}"
                )
            weight.copy_(torch.from_numpy(kernel))
            if norm is None:
                module.bias.copy_(torch.from_numpy(bias))  # type: ignore[operator]
                continue
            norm.running_mean.zero_()  # type: ignore[union-attr]
            norm.running_var.fill_(1.0 - norm.eps)  # type: ignore[union-attr]
            norm.weight.fill_(1.0)
            norm.bias.copy_(torch.from_numpy(bias))


def recover(twin: Path = DEFAULT_FLOAT_TWIN, bundle: Path = DEFAULT_BUNDLE) -> dict[str, Any]:
    """A trainer checkpoint dict of the model in ``twin``, the float twin of ``bundle``.

    The dict has the trainer's keys (arch, labels, preprocessing, state_dict) and, for the
    split, the bundle's recorded split fingerprint only: the photo lists stayed with the lost
    checkpoint.
    """
    manifest = load_bundle(bundle).manifest
    model = create_classifier(
        manifest.model.architecture, len(manifest.labels), manifest.preprocessing
    )
    load_folded(model, twin_layers(twin))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {
        "arch": manifest.model.architecture,
        "labels": list(manifest.labels),
        "preprocessing": manifest.preprocessing.to_dict(),
        "state_dict": state,
        "split": {"fingerprint": manifest.source.get("split_fingerprint", "")},
        "data": str(manifest.source.get("data", "")),
        "recovered_from": {
            "float_twin": twin.name,
            "float_twin_sha256": file_sha256(twin),
            "bundle_version": manifest.version,
            "bundle_sha256": manifest.model.sha256,
        },
    }


def cache_folder() -> Path:
    """Where rebuilt checkpoints are kept: ``$SMARTBIN_CACHE``, else ``$XDG_CACHE_HOME/smartbin``
    (``~/.cache/smartbin``)."""
    if os.environ.get("SMARTBIN_CACHE"):
        return Path(os.environ["SMARTBIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "smartbin"


def default_checkpoint(cache: Path | None = None) -> Path:
    """The default's recovered checkpoint, rebuilt into ``cache`` on first use and checked
    against :data:`RECOVERED_STATE_SHA256` whenever it is built or read."""
    path = (cache or cache_folder()) / CHECKPOINT_NAME
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if state_dict_sha256(saved["state_dict"]) == RECOVERED_STATE_SHA256:
            return path
        logger.warning("%s is not the recovered default: rebuilding it", path)
    write_default_checkpoint(path)
    return path


def write_default_checkpoint(out: Path) -> dict[str, Any]:
    """Rebuild the default's checkpoint from its twin at ``out``; refuses a twin or a result
    whose sha256 is not the recorded one."""
    if not DEFAULT_FLOAT_TWIN.is_file():
        raise FileNotFoundError(
            f"the default's float32 twin {DEFAULT_FLOAT_TWIN} is missing: run from a checkout "
            "of the repository (git lfs pull if it is a pointer), or pass --base-checkpoint"
        )
    twin_sha = file_sha256(DEFAULT_FLOAT_TWIN)
    if twin_sha != FLOAT_TWIN_SHA256:
        raise ValueError(
            f"{DEFAULT_FLOAT_TWIN} has sha256 {twin_sha}, expected {FLOAT_TWIN_SHA256}"
        )
    checkpoint = recover(DEFAULT_FLOAT_TWIN, DEFAULT_BUNDLE)
    got = state_dict_sha256(checkpoint["state_dict"])
    if got != RECOVERED_STATE_SHA256:
        raise ValueError(
            f"recovered state dict has sha256 {got}, expected {RECOVERED_STATE_SHA256}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    torch.save(checkpoint, partial)
    partial.replace(out)  # never a half-written checkpoint under the real name
    logger.info("recovered the default's float weights into %s", out)
    return checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="smartbin-recover", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, help=f"checkpoint to write (default: the cache, {CHECKPOINT_NAME})"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.out is None:
        print(default_checkpoint())
    else:
        write_default_checkpoint(args.out)
        print(args.out)


if __name__ == "__main__":
    main()
