"""``smartbin-add-alternative``: put a bundle's float32 model beside its int8 one.

A bundle with an alternative carries both builds of its network; a bin times each as it loads
and serves the faster on its CPU (docs/benchmarks.md, "Choosing per CPU"). The float32 model is
the converter's float twin (``smartbin-convert --float-twin``) of the same checkpoint. Its
accuracy goes into the manifest with it: by default the bundle's own ``metrics.float``, which
the converter measured on that checkpoint in float, before export; ``--metrics FILE`` takes a
JSON object measured on the .tflite itself instead. Adding it removes the bundle's signature
(the manifest changed): sign it again with ``smartbin-sign``.

    smartbin-add-alternative BUNDLE runs/release/float32.tflite
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from smartbin.bundle import BundleError, add_alternative, load_bundle

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:  # pragma: no cover - the tflite-runtime wheel of older Pis
    from tflite_runtime.interpreter import Interpreter


def float_metrics(bundle_dir: Path, metrics_file: Path | None) -> dict[str, Any]:
    if metrics_file is not None:
        metrics = json.loads(metrics_file.read_text())
        if not isinstance(metrics, dict):
            raise ValueError(f"{metrics_file} holds no JSON object")
        return metrics
    measured = load_bundle(bundle_dir).manifest.metrics.get("float")
    if not isinstance(measured, dict):
        raise ValueError(
            "the bundle's metrics have no 'float' figures: pass --metrics with the float32 "
            "model's own"
        )
    return {**measured, "measured_on": "the checkpoint in float, before export to .tflite"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`: "))
    parser.add_argument("bundle", type=Path, help="the bundle folder (changed in place)")
    parser.add_argument("model", type=Path, help="the float32 .tflite of the same network")
    parser.add_argument("--metrics", type=Path, help="a JSON object: the model's own accuracy")
    args = parser.parse_args(argv)
    try:
        content = args.model.read_bytes()
        interpreter = Interpreter(model_content=content)
        dtype = interpreter.get_input_details()[0]["dtype"].__name__
        if dtype != "float32":
            raise ValueError(f"{args.model} takes {dtype}: a float32 model is expected")
        bundle = add_alternative(
            args.bundle, content, "float32", float_metrics(args.bundle, args.metrics)
        )
    except (BundleError, ValueError, OSError) as err:
        sys.exit(f"smartbin-add-alternative: {err}")
    for model in bundle.models:
        print(f"{model.file}: {model.quantization}, {model.bytes} bytes, sha256 {model.sha256}")
    print(f"{bundle.path}: re-sign it if your bins require signed bundles (smartbin-sign)")


if __name__ == "__main__":
    main()
