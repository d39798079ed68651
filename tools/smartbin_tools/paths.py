"""What the tools measure by default: the checkout's default bundle, its float32 twin and the
sample photos. The tools run from a checkout (they are not part of any installed part), and they
reach the edge only by running it, so they name these files by their place in the repository."""

from __future__ import annotations

import argparse
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE_DIR = REPOSITORY / "edge_service" / "default_bundle"
SAMPLES_DIR = REPOSITORY / "edge_service" / "samples"
# The default bundle's float32 twin (smartbin-convert --float-twin), kept with the test data.
DEFAULT_FLOAT_TWIN = REPOSITORY / "tests" / "data" / "default_float32.tflite"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--bundle and --float-model, the pair of models every timing tool compares."""
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE_DIR, help="int8 bundle")
    parser.add_argument(
        "--float-model",
        type=Path,
        default=DEFAULT_FLOAT_TWIN,
        help="the bundle's float32 .tflite twin (smartbin-convert --float-twin)",
    )


def check_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error unless ``--float-model`` names a file (the bundle is checked when read)."""
    if not args.float_model.is_file():
        parser.error(f"float32 model {args.float_model} not found: pass --float-model")
