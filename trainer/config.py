"""The training recipe as a typed config: every setting of a run, checked before anything runs.

A run's settings come from three places, later ones winning: the defaults below, a YAML recipe
(``--config``, such as ``trainer/recipes/release.yaml``) and the command-line flags. Each field
of ``TrainConfig`` is one recipe key and one flag (``batch_size`` is ``--batch-size``). A key
the config does not know, or a value it refuses, is an error that names the key and the file (or
the flag) it came from: a misspelt ``epoch: 3`` must not train for the default 25 epochs. Paths
in a recipe are taken from the working directory, as on the command line.

The run folder's ``args.yaml`` is the config as this model writes it, and reads back as a
recipe.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
from pathlib import Path
from typing import Any, Literal, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from trainer.data import photo_paths


class ConfigError(ValueError):
    """A recipe or flags the config refuses; the message names each key and where it came
    from."""


class TrainConfig(BaseModel):
    """Every setting of a training run (``smartbin-train --help`` lists them as flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field(
        description="image folder (one sub-folder per class) or a datasets hub id such as "
        "garythung/trashnet"
    )
    arch: str = Field("mobilenetv2_100", min_length=1, description="timm model name")
    weights: Path | None = Field(None, description="ImageNet state_dict file to start from")
    hub_pretrained: bool = Field(
        False, description="download timm's pretrained weights instead (needs internet)"
    )
    img_size: int | None = Field(None, ge=32, description="model input size (default: timm's)")
    epochs: int = Field(25, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, description="peak learning rate of the new head")
    body_lr: float = Field(3e-4, ge=0, description="peak learning rate of the body")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="under torchrun, how --lr and --body-lr follow the effective batch "
        "(batch size x processes): none keeps them, linear multiplies them by the process "
        "count, sqrt by its square root",
    )
    weight_decay: float = Field(0.02, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    patience: int = Field(
        6, ge=1, description="stop after this many epochs without a better val accuracy"
    )
    keep: Literal["best", "last"] = Field(
        "best",
        description="which epoch's weights the checkpoint keeps: best, the highest val accuracy "
        "(early stopping by --patience), or last, every epoch run (for a short fine-tune off "
        "the white board, whose val accuracy on the board falls as it learns other scenes)",
    )
    max_minutes: float | None = Field(
        None, gt=0, description="stop after the epoch that passes this much training time"
    )
    seed: int = Field(0, description="seed of the training run")
    split_seed: int = Field(0, description="seed of the train/val/test split")
    ema_decay: float = Field(
        0.998,
        ge=0,
        lt=1,
        description="keep an exponential moving average of the weights, evaluated and saved in "
        "place of the raw weights (0 turns it off)",
    )
    split: Path | None = Field(None, description="reuse this split.json instead of making one")
    init: Path | None = Field(
        None,
        description="start from this checkpoint's trained weights (same arch, classes and split)",
    )
    qat: bool = Field(
        False,
        description="quantization-aware fine-tuning of --init's model: train while rounding as "
        "the int8 model will (val accuracy is then the simulated int8 one)",
    )
    backgrounds: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of training reads on which the item is cut off its white board and "
        "put on a random backdrop (trainer/backgrounds.py); 0 turns it off",
    )
    other_items: float = Field(
        0.0,
        ge=0,
        le=1,
        description="with --backgrounds: share of the backdrops that are a piece of another "
        "training item (a bin's floor is mostly other waste) instead of a drawn one",
    )
    backdrop_photos: Path | None = Field(
        None,
        description="with --backgrounds: a folder of photos of floors, walls, ground or empty "
        "bins to put items on (--photos of the backdrops that are not a piece of another item)",
    )
    photos: float = Field(
        0.5,
        ge=0,
        le=1,
        description="with --backdrop-photos: share of the backdrops (those not a piece of "
        "another item) that are one of those photos instead of a drawn one",
    )
    photometric: Literal["camera", "strong"] = Field(
        "camera",
        description="augmentation of light and colour: camera (jitter, greyscale, blur), or "
        "strong (camera, then other cameras' white balance, smear, noise, low resolution and "
        "JPEG quality 10-70)",
    )
    freeze_batchnorm: bool = Field(
        False,
        description="keep batch norm on its running statistics while training (fine-tuning a "
        "trained model, or one whose batch norm is folded into its convolutions)",
    )
    warmup_epochs: int = Field(
        1,
        ge=0,
        description="epochs of linear learning-rate warm-up before the cosine decay "
        "(fewer than --epochs)",
    )
    teacher: list[Path] = Field(
        default_factory=list,
        description="checkpoint (same classes and split) whose answers the model also learns "
        "from; repeat for an ensemble",
    )
    distill_weight: float = Field(
        0.7,
        ge=0,
        le=1,
        description="share of the teachers' answers in the loss (the labels get the rest)",
    )
    distill_temperature: float = Field(2.0, gt=0, description="softening of all answers")
    limit_per_class: int | None = Field(
        None, ge=1, description="use at most N images per class per side (quick runs)"
    )
    workers: int = Field(2, ge=0, description="data loader processes")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto, cpu or cuda"
    )
    out: Path = Field(Path("runs"), description="where run folders go")
    name: str | None = Field(
        None, pattern=r"^[^/\\]+$", description="run folder name (default: arch and time)"
    )
    mlflow: bool = Field(
        True, description="log to MLflow (MLFLOW_TRACKING_URI, else a store in --out)"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_default_warmup_in_a_one_epoch_run(cls, data: Any) -> Any:
        # The default warm-up (one epoch) would leave a one-epoch run no decay; a warm-up the
        # user asked for is checked below instead.
        if isinstance(data, dict) and "warmup_epochs" not in data:
            epochs = data.get("epochs", cls.model_fields["epochs"].default)
            with contextlib.suppress(TypeError, ValueError):  # a bad value is refused later
                if int(epochs) <= cls.model_fields["warmup_epochs"].default:
                    return {**data, "warmup_epochs": 0}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.qat and (self.init is None or self.ema_decay):
            raise ValueError("--qat fine-tunes a trained model: give --init and --ema-decay 0")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be fewer than epochs "
                f"({self.epochs}): the learning rate would never decay"
            )
        if self.backdrop_photos is not None:
            self._check_backdrop_photos(self.backdrop_photos)
        return self

    def _check_backdrop_photos(self, folder: Path) -> None:
        if not folder.is_dir():
            raise ValueError(f"--backdrop-photos {folder} is not a folder")
        if not photo_paths(folder):
            raise ValueError(f"--backdrop-photos {folder} holds no photos")
        if not self.backgrounds:
            raise ValueError("--backdrop-photos puts items on photos: give --backgrounds too")

    @classmethod
    def from_sources(
        cls, recipe: Path | None = None, flags: dict[str, Any] | None = None
    ) -> TrainConfig:
        """The defaults, then the ``recipe`` file's values, then ``flags`` (field names).

        Raises:
            ConfigError: an unreadable recipe, an unknown key or a refused value, each named
                with the file or flag it came from.
        """
        from_recipe = read_recipe(recipe) if recipe is not None else {}
        flags = flags or {}
        try:
            return cls.model_validate({**from_recipe, **flags})
        except ValidationError as err:
            lines = [_describe(e, recipe, from_recipe, flags) for e in err.errors()]
            raise ConfigError("\n".join(lines)) from None

    def to_yaml(self) -> str:
        """The config as a recipe (paths as text, fields in declaration order)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def read_recipe(path: Path) -> dict[str, Any]:
    """A recipe's keys and values, unchecked (``TrainConfig.from_sources`` checks them).

    Raises:
        ConfigError: the file is missing, not YAML, or not a mapping of keys to values.
    """
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"recipe {path} cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {err}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise ConfigError(f"recipe {path} must be a mapping of setting names to values")
    return loaded


def flag(name: str) -> str:
    """The command-line flag of a field: ``batch_size`` is ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _describe(
    error: ErrorDetails, recipe: Path | None, from_recipe: dict[str, Any], flags: dict[str, Any]
) -> str:
    """One validation error, said with the flag or the recipe file and key it came from."""
    if not error["loc"]:  # the model's own check across fields
        where = f" (recipe {recipe} with the command line)" if recipe is not None else ""
        return str(error["ctx"]["error"]) + where if "ctx" in error else error["msg"] + where
    key = str(error["loc"][0])
    path = ".".join(str(part) for part in error["loc"])
    if key in flags:
        origin = flag(key)
    elif key in from_recipe:
        origin = f"recipe {recipe}: {path}"
    else:
        origin = path
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, TrainConfig.model_fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        source = f"recipe {recipe}" if key in from_recipe else "the settings given"
        return f"{source}: unknown key {key!r}{hint}"
    if error["type"] == "missing":
        return f"{path} is missing: give {flag(key)} or put {key}: in the recipe"
    return f"{origin}: {error['msg']}, not {error['input']!r}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per field of ``TrainConfig``.

    Flags left out are left out of the namespace too (``argparse.SUPPRESS``), so that a recipe's
    value is only overridden by a flag actually given. Values stay text for the config to check
    (``--epochs 0`` is refused by the same rule as ``epochs: 0`` in a recipe).
    """
    parser.add_argument(
        "--config", type=Path, help="YAML recipe of settings (keys as below, without --)"
    )
    for name, field in TrainConfig.model_fields.items():
        described = field.description or name.replace("_", " ")
        if field.is_required():
            help_text = f"{described} (required, here or in the recipe)"
        else:
            default = field.get_default(call_default_factory=True)
            help_text = described if default in (None, []) else f"{described} (default: {default})"
        if field.annotation is bool:
            parser.add_argument(
                flag(name),
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif get_origin(field.annotation) is list:
            parser.add_argument(
                flag(name), action="append", default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(flag(name), default=argparse.SUPPRESS, help=help_text)
