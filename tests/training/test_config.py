"""The recipe is a typed config: an unknown key or a refused value stops the run, named with the
file or flag it came from; flags override the recipe; a run's args.yaml reads back as a recipe."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from helpers import PHOTOS
from tiny import tiny_bundle_args, tiny_train_args

import trainer
from trainer.config import ConfigError, TrainConfig
from trainer.train import parse_args, run

RECIPES = sorted((Path(trainer.__file__).parent / "recipes").glob("*.yaml"))


def write_recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What smartbin-train says when it refuses ``argv``."""
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_the_shipped_recipes_are_there() -> None:
    assert {p.stem for p in RECIPES} >= {"release", "release-qat"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_each_shipped_recipe_loads_with_its_values(recipe: Path) -> None:
    config = parse_args(["--config", str(recipe), "--data", "photos"])
    written = yaml.safe_load(recipe.read_text())
    assert config.model_dump(mode="json") | written == config.model_dump(mode="json")


@pytest.mark.parametrize(
    "text, named",
    [
        ("epoch: 3\n", "unknown key 'epoch' (did you mean 'epochs'?)"),
        ("batch-size: 16\n", "unknown key 'batch-size' (did you mean 'batch_size'?)"),
        ("learning_rate: 0.01\n", "unknown key 'learning_rate'"),
        ("epochs: 0\n", "epochs: Input should be greater than or equal to 1"),
        ("lr: -0.001\n", "lr: Input should be greater than 0"),
        ("ema_decay: 1.5\n", "ema_decay: Input should be less than 1"),
        ("batch_size: many\n", "batch_size: Input should be a valid integer"),
        ("teacher: [a.pt, [b.pt]]\n", "teacher.1: Input is not a valid path"),
    ],
)
def test_a_recipe_key_it_does_not_know_or_a_bad_value_is_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, named: str
) -> None:
    recipe = write_recipe(tmp_path, text)
    said = refusal(["--config", str(recipe), "--data", "photos"], capsys)
    assert f"recipe {recipe}: {named}" in said


def test_every_refusal_is_reported_at_once(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "epoch: 3\nlr: 0\nqat: true\n")
    with pytest.raises(ConfigError) as refused:
        TrainConfig.from_sources(recipe, {"data": "photos"})
    assert "unknown key 'epoch'" in str(refused.value)
    assert "lr: Input should be greater than 0" in str(refused.value)


@pytest.mark.parametrize(
    "text, said",
    [("- epochs: 3\n", "must be a mapping"), ("epochs: [3\n", "is not valid YAML")],
)
def test_a_recipe_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str, said: str) -> None:
    recipe = write_recipe(tmp_path, text)
    with pytest.raises(ConfigError, match=f"recipe {recipe} {said}"):
        TrainConfig.from_sources(recipe, {"data": "photos"})


def test_a_missing_recipe_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    absent = tmp_path / "absent.yaml"
    assert f"recipe {absent} cannot be read" in refusal(["--config", str(absent)], capsys)


def test_flags_override_the_recipe_and_are_named_when_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path, "data: photos\nepochs: 3\nbatch_size: 4\nqat: false\n")
    config = parse_args(["--config", str(recipe), "--epochs", "5", "--teacher", "a.pt"])
    assert (config.epochs, config.batch_size, config.data) == (5, 4, "photos")
    assert config.teacher == [Path("a.pt")] and config.lr == 1e-3  # the default
    said = refusal(["--config", str(recipe), "--epochs", "0"], capsys)
    assert "--epochs: Input should be greater than or equal to 1, not '0'" in said
    assert str(recipe) not in said


def test_the_data_must_come_from_a_flag_or_the_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert "data is missing: give --data or put data: in the recipe" in refusal([], capsys)


def test_warm_up_must_leave_epochs_to_decay_over(capsys: pytest.CaptureFixture[str]) -> None:
    said = refusal(["--data", "photos", "--epochs", "2", "--warmup-epochs", "2"], capsys)
    assert "warmup_epochs (2) must be fewer than epochs (2)" in said
    assert parse_args(["--data", "photos", "--epochs", "1", "--warmup-epochs", "0"]).epochs == 1


def test_the_config_written_reads_back_as_the_same_config(tmp_path: Path) -> None:
    argv = ["--data", "photos", "--teacher", "a.pt", "--teacher", "b.pt", "--init", "a.pt"]
    config = parse_args([*argv, "--img-size", "128", "--no-mlflow", "--max-minutes", "1.5"])
    recipe = write_recipe(tmp_path, config.to_yaml())
    assert parse_args(["--config", str(recipe)]) == config


def test_a_run_records_its_config_as_a_recipe(tiny_bundle: Path, tiny_data: Path) -> None:
    recorded = tiny_bundle.parent / "run" / "args.yaml"
    expected = parse_args(tiny_bundle_args(tiny_data, tiny_bundle.parent))
    assert TrainConfig.from_sources(recorded) == expected
    assert expected.epochs == 4 and expected.lr == 0.003  # not the defaults


def test_a_one_epoch_run_needs_no_warm_up_flag() -> None:
    """The default one-epoch warm-up steps aside in a one-epoch run; an asked-for one does not."""
    assert parse_args(["--data", "photos", "--epochs", "1"]).warmup_epochs == 0
    assert parse_args(["--data", "photos", "--epochs", "3"]).warmup_epochs == 1


@pytest.mark.parametrize(("keep", "epochs_run", "kept"), [("best", 2, 1), ("last", 3, 3)])
def test_keep_chooses_the_epoch_whose_weights_the_checkpoint_holds(
    tmp_path: Path, keep: str, epochs_run: int, kept: int
) -> None:
    # The weights hardly move (learning rate 1e-12, batch norm frozen), so val accuracy is the
    # same every epoch: best keeps the first and stops at --patience 1; last runs every epoch.
    still = ["--lr", "1e-12", "--body-lr", "0", "--freeze-batchnorm", "--ema-decay", "0"]
    args = tiny_train_args(PHOTOS, tmp_path, "run", *still, "--keep", keep, epochs=3)
    checkpoint = torch.load(run(parse_args([*args, "--patience", "1"])), weights_only=True)
    with (tmp_path / "run" / "summary.csv").open() as rows:
        assert len(list(csv.DictReader(rows))) == epochs_run
    assert checkpoint["best_epoch"] == kept
