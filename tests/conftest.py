"""Shared fixtures: real images, a real tiny trained-and-converted bundle, a real server."""

from __future__ import annotations

import io
import shutil
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from PIL import Image, ImageDraw

from edge_service.bundle import Bundle
from edge_service.config import ServiceConfig
from edge_service.loadgen import ServiceProcess
from edge_service.server import RunningService, create_server

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRASHNET = ROOT.parent / "shared" / "data" / "trashnet"
SHARED_WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_v2-b0353104.pth"
TINY_SIZE = 96


def synthetic_class_images(folder: Path, name: str, count: int, seed: int) -> None:
    """Photos a test can make: a coloured shape per class on a light background."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    hue = tuple(int(v) for v in rng.integers(0, 255, 3))
    for i in range(count):
        image = Image.new("RGB", (160, 120), tuple(int(v) for v in rng.integers(200, 255, 3)))
        draw = ImageDraw.Draw(image)
        x, y = (int(v) for v in rng.integers(10, 60, 2))
        shape = draw.ellipse if seed % 2 else draw.rectangle
        shape((x, y, x + 60 + i % 20, y + 40), fill=hue)
        image.save(folder / f"{name}{i}.jpg", quality=90)


def make_tiny_dataset(root: Path, per_class: int = 12) -> Path:
    """A few real TrashNet photos per class when available, else synthetic ones."""
    if SHARED_TRASHNET.is_dir():
        for class_dir in sorted(p for p in SHARED_TRASHNET.iterdir() if p.is_dir()):
            (root / class_dir.name).mkdir(parents=True)
            for path in sorted(class_dir.glob("*.jpg"))[:per_class]:
                shutil.copy(path, root / class_dir.name / path.name)
    else:
        for index, name in enumerate(["alpha", "beta", "gamma", "delta"]):
            synthetic_class_images(root / name, name, per_class, seed=index)
    return root


def tiny_train_args(data: Path, out: Path, name: str, *extra: str, epochs: int = 1) -> list[str]:
    """smartbin-train's arguments for a quick run on the tiny data, plus ``extra``."""
    return [
        "--data",
        str(data),
        "--img-size",
        str(TINY_SIZE),
        "--epochs",
        str(epochs),
        "--patience",  # a tiny val side is noisy: train every epoch asked for
        str(epochs),
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--out",
        str(out),
        "--name",
        name,
        "--no-mlflow",
        *extra,
    ]


def tiny_checkpoint(tiny_bundle: Path) -> Path:
    """The trained checkpoint the tiny bundle was converted from."""
    return tiny_bundle.parent / "run" / "checkpoint.pt"


def train_and_convert(data: Path, work: Path, epochs: int = 2) -> Path:
    """Run the real trainer and converter CLIs' code paths; return the bundle folder."""
    from converter.convert import convert
    from trainer.train import parse_args, run

    weights = ["--weights", str(SHARED_WEIGHTS)] if SHARED_WEIGHTS.is_file() else []
    argv = tiny_train_args(data, work, "run", *weights, epochs=epochs)
    checkpoint = run(parse_args(argv))
    bundle = work / "bundle"
    convert(
        checkpoint,
        bundle,
        calibration_count=16,
        max_drop=100.0,
        version="tiny-test",
        float_twin=work / "float32.tflite",
    )
    return bundle


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_and_convert(tiny_data, tmp_path_factory.mktemp("train"))


def local_config(bundle: Path, **overrides: object) -> ServiceConfig:
    settings = {
        "bundle": bundle,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
        "num_threads": 1,
    }
    settings.update(overrides)
    return ServiceConfig(**settings)


@pytest.fixture
def service(
    tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    # Tests offer bundles from their own temporary folders.
    running = create_server(local_config(tiny_bundle, reload_dirs=[tmp_path_factory.getbasetemp()]))
    yield running
    running.stop(grace=1)


@pytest.fixture
def channel(service: RunningService) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as chan:
        yield chan


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail the test when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(0.02)


def scrape(service: RunningService | ServiceProcess) -> str:
    """The service's /metrics page, as Prometheus reads it."""
    url = f"http://127.0.0.1:{service.metrics_port}/metrics"
    return urllib.request.urlopen(url, timeout=5).read().decode()


def metric(service: RunningService | ServiceProcess, line_start: str) -> float:
    """The value of the first /metrics sample whose line starts with ``line_start``; 0 when
    there is none yet."""
    for line in scrape(service).splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def slow_png(width: int = 6000, height: int = 5000) -> bytes:
    """A small file that is slow to classify: a 30-megapixel gradient PNG (about 400 kB)."""
    y, x = np.indices((height, width), dtype=np.uint32)
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def open_float_twin(path: Path, bundle: Bundle) -> tuple[Interpreter, dict, dict]:
    """The float32 twin of ``bundle`` at ``path``, checked to take float32 pixels of the
    bundle's input size and give one float32 score per label; with its input and output."""
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    size = bundle.preprocessing.input_size
    assert inp["dtype"] == np.float32 and tuple(inp["shape"]) == (1, size, size, 3)
    assert out["dtype"] == np.float32 and out["shape"][-1] == len(bundle.labels)
    return interpreter, inp, out
