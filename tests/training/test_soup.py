"""A model soup (trainer/soup.py): the average of models fine-tuned from one start, moved back
toward it, written as a checkpoint the converter takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_robustness import tiny_model

from trainer import soup

KEY = "backbone.classifier.weight"


def checkpoint(seed: int, labels: list[str] | None = None) -> dict[str, Any]:
    return {
        "arch": "tf_efficientnet_lite0",
        "labels": labels or ["a", "b", "c", "d", "e", "f"],
        "split": {"fingerprint": "f00d"},
        "state_dict": tiny_model(seed).state_dict(),
    }


def test_the_soup_is_the_mean_moved_back_toward_the_start(tmp_path: Path) -> None:
    start, one, two = checkpoint(0), checkpoint(1), checkpoint(2)
    for name, c in (("start", start), ("one", one), ("two", two)):
        torch.save(c, tmp_path / f"{name}.pt")
    soup.main(
        [
            str(tmp_path / "one.pt"),
            str(tmp_path / "two.pt"),
            "--start",
            str(tmp_path / "start.pt"),
            "--keep-base",
            "0.25",
            "--out",
            str(tmp_path / "soup.pt"),
        ]
    )
    written = torch.load(tmp_path / "soup.pt", weights_only=True)
    mean = (one["state_dict"][KEY] + two["state_dict"][KEY]) / 2
    expected = 0.75 * mean + 0.25 * start["state_dict"][KEY]
    torch.testing.assert_close(written["state_dict"][KEY], expected)
    assert written["labels"] == start["labels"] and written["soup"] == {"ingredients": 2}
    alone = soup.soup([one], start, 0.0)["state_dict"]
    assert all(torch.equal(v, one["state_dict"][k]) for k, v in alone.items())


def test_models_of_other_labels_splits_or_shapes_are_refused(tmp_path: Path) -> None:
    start = checkpoint(0)
    torch.save(start, tmp_path / "start.pt")
    other_split = dict(checkpoint(2), split={"fingerprint": "beef"})
    for name, c in (
        ("labels", checkpoint(1, ["a", "b", "c", "d", "e", "g"])),
        ("split", other_split),
    ):
        torch.save(c, tmp_path / f"{name}.pt")
        args = [str(tmp_path / f"{name}.pt"), "--start", str(tmp_path / "start.pt")]
        with pytest.raises(ValueError, match=name):
            soup.main([*args, "--out", str(tmp_path / "soup.pt")])
    assert not (tmp_path / "soup.pt").exists()
    other = dict(start, state_dict=dict(start["state_dict"], **{KEY: torch.zeros(4, 1280)}))
    with pytest.raises(ValueError, match="classifier"):
        soup.soup([start, other], start, 0.5)
