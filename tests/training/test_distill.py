"""Distillation: a model learning from trained teachers on the same split, never another."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tiny import tiny_checkpoint, tiny_train_args

from trainer.distill import distillation_loss
from trainer.train import parse_args, run


def test_loss_is_zero_on_the_teachers_answer_and_pulls_towards_it() -> None:
    teacher = torch.tensor([[2.0, 0.5, -1.0]])
    taught = (teacher / 2.0).softmax(1)
    assert distillation_loss(teacher, taught, 2.0).item() == pytest.approx(0.0, abs=1e-6)

    student = torch.tensor([[-1.0, 0.5, 2.0]], requires_grad=True)
    before = distillation_loss(student, taught, 2.0)
    before.backward()
    with torch.no_grad():
        stepped = student - 0.5 * student.grad
    assert before.item() > 0.1
    assert distillation_loss(stepped, taught, 2.0).item() < before.item()


def test_student_trains_from_a_teacher_of_the_same_split(
    tiny_data: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    teacher = tiny_checkpoint(tiny_bundle)
    split = teacher.parent / "split.json"
    argv = ["--split", str(split), "--init", str(teacher), "--teacher", str(teacher)]
    checkpoint = run(parse_args(tiny_train_args(tiny_data, tmp_path, "student", *argv)))

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert (
        saved["split"]["fingerprint"]
        == torch.load(teacher, weights_only=True)["split"]["fingerprint"]
    )
    recorded = yaml.safe_load((checkpoint.parent / "args.yaml").read_text())
    assert recorded["teacher"] == [str(teacher)] and recorded["init"] == str(teacher)


@pytest.mark.parametrize("flag", ["--teacher", "--init"])
def test_a_checkpoint_from_another_split_is_refused(
    tiny_data: Path, tiny_bundle: Path, tmp_path: Path, flag: str
) -> None:
    # Its training photos would include some of this split's val and test photos.
    argv = tiny_train_args(
        tiny_data, tmp_path, "student", "--split-seed", "1", flag, str(tiny_checkpoint(tiny_bundle))
    )
    with pytest.raises(ValueError, match="trained on split .* pass that run's split.json"):
        run(parse_args(argv))
