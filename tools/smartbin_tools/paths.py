"""What the tools measure by default: the checkout's default bundle, its float32 twin and the
sample photos. The tools run from a checkout (they are not part of any installed part), and they
reach the edge only by running it, so they name these files by their place in the repository."""

from __future__ import annotations

from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE_DIR = REPOSITORY / "edge_service" / "default_bundle"
SAMPLES_DIR = REPOSITORY / "edge_service" / "samples"
# The default bundle's float32 twin (smartbin-convert --float-twin), kept with the test data.
DEFAULT_FLOAT_TWIN = REPOSITORY / "tests" / "data" / "default_float32.tflite"
