"""smartbin-train under torchrun: two CPU processes (gloo) train as one run, whose one run folder
and checkpoint are those of a single process, and whose checkpoint the converter takes."""

from __future__ import annotations

import ast
import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ROOT
from tiny import tiny_train_args

from converter.convert import convert
from smartbin.bundle import load_bundle
from smartbin.preprocessing import Preprocessing
from trainer.data import load_source
from trainer.distributed import Ranks, lr_factor, rank_device
from trainer.evaluate import eval_tensor, predict
from trainer.model import build_from_checkpoint
from trainer.train import parse_args, run

# A small timm network at 64 px: the two runs and the conversion take seconds, not minutes.
SMALL = ("--arch", "test_efficientnet", "--img-size", "64")
EPOCH_LINE = re.compile(r"\[rank (\d)/2\] epoch (\d+): (\{[^}]*\})")


def torchrun(data: Path, out: Path) -> str:
    """``smartbin-train`` in two CPU processes under torchrun; returns what they printed."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "trainer.train",
        *tiny_train_args(data, out, "ddp", *SMALL, epochs=2),
    ]
    ours = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in ours} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-4000:]
    return printed


def accuracy_on(checkpoint: dict[str, Any], data: Path) -> float:
    """The float model's accuracy on every photo of ``data``, as the bin prepares them."""
    inputs, targets = eval_tensor(
        load_source(str(data)).samples, Preprocessing.from_dict(checkpoint["preprocessing"])
    )
    model = build_from_checkpoint(checkpoint)
    predicted = predict(model, inputs, torch.device("cpu")).argmax(1)
    return float((predicted == targets.numpy()).mean())


def summary(folder: Path) -> list[dict[str, float]]:
    with (folder / "summary.csv").open() as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def test_two_processes_train_one_run_the_converter_takes(tiny_data: Path, tmp_path: Path) -> None:
    printed = torchrun(tiny_data, tmp_path / "ddp")
    # The same effective batch in one process: 16 images an update, as many updates an epoch.
    extra = (*SMALL, "--batch-size", "16")
    single = run(parse_args(tiny_train_args(tiny_data, tmp_path / "one", "one", *extra, epochs=2)))

    # One run folder with one summary: rank 1 wrote nothing.
    assert [p.name for p in (tmp_path / "ddp").iterdir()] == ["ddp"]
    folder = tmp_path / "ddp" / "ddp"
    assert list((tmp_path / "ddp").rglob("summary.csv")) == [folder / "summary.csv"]
    assert "effective batch 16" in printed
    assert "[rank 0/2] kept epoch" in printed and "[rank 1/2] kept epoch" not in printed
    # Every rank logged the same figures, the images of both processes together.
    lines = EPOCH_LINE.findall(printed)
    by_rank = {rank: [ast.literal_eval(row) for r, _, row in lines if r == rank] for rank in "01"}
    assert len(by_rank["0"]) == 2 and by_rank["0"] == by_rank["1"], lines
    rows, single_rows = summary(folder), summary(single.parent)
    assert [r["images"] for r in rows] == [r["images"] for r in single_rows]

    # The checkpoint is a single process's: the plain model's keys, shapes and types.
    ddp = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    one = torch.load(single, map_location="cpu", weights_only=True)
    assert list(ddp["state_dict"]) == list(one["state_dict"])
    for key, tensor in one["state_dict"].items():
        assert (ddp["state_dict"][key].shape, ddp["state_dict"][key].dtype) == (
            tensor.shape,
            tensor.dtype,
        )
    assert ddp.keys() == one.keys() and ddp["split"] == one["split"]

    # Both reach the same accuracy within noise: three standard errors of the difference of
    # two accuracies on these photos (at most 0.26 for 67 photos). Four updates from random
    # weights leave both near chance; the test's teeth are above, this catches a run gone wrong.
    count = len(load_source(str(tiny_data)).samples)
    a, b = accuracy_on(ddp, tiny_data), accuracy_on(one, tiny_data)
    p = (a + b) / 2
    assert abs(a - b) <= 3 * math.sqrt(2 * max(p * (1 - p), 0.1) / count), (a, b)

    bundle = tmp_path / "bundle"
    convert(folder / "checkpoint.pt", bundle, calibration_count=8, max_drop=100.0, version="ddp")
    assert list(load_bundle(bundle).labels) == ddp["labels"]


def test_ranks_come_from_torchrun_and_pick_each_process_its_gpu() -> None:
    assert Ranks.from_environment({}) == Ranks(0, 1, 0)
    ranks = Ranks.from_environment({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (ranks.rank, ranks.world_size, ranks.local_rank) == (5, 8, 1)
    assert ranks.distributed and not ranks.main
    assert rank_device("cuda", 3) == torch.device("cuda", 3)
    assert rank_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(ValueError, match="the GPU of its LOCAL_RANK"):
        rank_device("cuda:0", 1)


@pytest.mark.parametrize("scaling, factor", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_learning_rate_scaling(scaling: str, factor: float) -> None:
    assert lr_factor(scaling, 4) == factor  # type: ignore[arg-type]
    config = parse_args(["--data", "photos", "--lr-scaling", scaling])
    assert config.lr_scaling == scaling
