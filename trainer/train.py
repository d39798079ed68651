"""``smartbin-train``: fine-tune an ImageNet-pretrained timm model on labelled photos.

Every run writes a folder: args.yaml, split.json (with its fingerprint), summary.csv (one row per
epoch), curves.png, confusion_*.png, report.json and checkpoint.pt. The checkpoint carries the
class list, the preprocessing and the split, so the converter needs nothing else.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from smartbin.preprocessing import Preprocessing, decode_image
from trainer.data import SPLITS, Sample, load_source, make_split_manifest, select
from trainer.distill import Teachers, distillation_loss, load_checkpoint
from trainer.evaluate import classification_report, eval_tensor, plot_confusion, predict
from trainer.model import PixelClassifier, create_classifier, default_preprocessing
from trainer.qat import attach_fake_quant, plain_state_dict, start_rounding

logger = logging.getLogger(__name__)


def camera_augmentation(size: int) -> v2.Compose:
    """Augmentation for photos from other bins: framing, orientation, light, colour, focus."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.3, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomApply([v2.RandomRotation(25)], p=0.5),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.05)], p=0.8),
            v2.RandomGrayscale(0.05),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.2),
        ]
    )


class TrainImages(Dataset):
    """Training photos decoded once (uint8 CHW), augmented on every read."""

    def __init__(self, samples: list[Sample], size: int) -> None:
        # Decode at about twice the model input: crops stay sharp and memory stays small.
        self.images = [
            torch.from_numpy(np.array(decode_image(s.data, min_size=2 * size)))
            .permute(2, 0, 1)
            .contiguous()
            for s in samples
        ]
        self.labels = [s.label for s in samples]
        self.transform = camera_augmentation(size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]).float(), self.labels[index]


@dataclass
class Split:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", type=Path, help="YAML file of defaults for the flags")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[config_parser])
    parser.add_argument(
        "--data",
        required=True,
        help="image folder (one sub-folder per class) or a datasets hub id "
        "such as garythung/trashnet",
    )
    parser.add_argument("--arch", default="mobilenetv2_100", help="timm model name")
    parser.add_argument("--weights", type=Path, help="ImageNet state_dict file to start from")
    parser.add_argument(
        "--hub-pretrained",
        action="store_true",
        help="download timm's pretrained weights instead (needs internet)",
    )
    parser.add_argument("--img-size", type=int, help="model input size (default: timm's)")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the new head")
    parser.add_argument("--body-lr", type=float, default=3e-4, help="learning rate of the body")
    parser.add_argument("--weight-decay", type=float, default=0.02)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument(
        "--patience",
        type=int,
        default=6,
        help="stop after this many epochs without a better val accuracy",
    )
    parser.add_argument(
        "--max-minutes", type=float, help="stop after the epoch that passes this much training time"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the training run")
    parser.add_argument(
        "--split-seed", type=int, default=0, help="seed of the train/val/test split"
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=0.998,
        help="keep an exponential moving average of the weights, evaluated and "
        "saved in place of the raw weights (0 turns it off)",
    )
    parser.add_argument("--split", type=Path, help="reuse this split.json instead of making one")
    parser.add_argument(
        "--init",
        type=Path,
        help="start from this checkpoint's trained weights (same arch, classes and split)",
    )
    parser.add_argument(
        "--qat",
        action="store_true",
        help="quantization-aware fine-tuning of --init's model: train while rounding as the int8 "
        "model will (val accuracy is then the simulated int8 one)",
    )
    parser.add_argument(
        "--warmup-epochs", type=int, default=1, help="epochs of linear learning-rate warm-up"
    )
    parser.add_argument(
        "--teacher",
        type=Path,
        action="append",
        default=[],
        help="checkpoint (same classes and split) whose answers the model also learns from; "
        "repeat for an ensemble",
    )
    parser.add_argument(
        "--distill-weight",
        type=float,
        default=0.7,
        help="share of the teachers' answers in the loss (the labels get the rest)",
    )
    parser.add_argument(
        "--distill-temperature", type=float, default=2.0, help="softening of all answers"
    )
    parser.add_argument(
        "--limit-per-class", type=int, help="use at most N images per class per side (quick runs)"
    )
    parser.add_argument("--workers", type=int, default=2, help="data loader processes")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="where run folders go")
    parser.add_argument("--name", help="run folder name (default: arch and time)")
    parser.add_argument(
        "--mlflow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log to MLflow (MLFLOW_TRACKING_URI, else a store in --out)",
    )
    args, _ = config_parser.parse_known_args(argv)
    if args.config:
        parser.set_defaults(**yaml.safe_load(args.config.read_text()))
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, not {args.epochs}")
    if args.qat and (args.init is None or args.ema_decay):
        parser.error("--qat fine-tunes a trained model: give --init and --ema-decay 0")
    return args


def _plain(value: Any) -> Any:
    """An argument value as YAML can write it (paths as text)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _limit(samples: list[Sample], per_class: int | None) -> list[Sample]:
    if not per_class:
        return samples
    counts: dict[int, int] = {}
    kept = []
    for sample in samples:
        if counts.get(sample.label, 0) < per_class:
            counts[sample.label] = counts.get(sample.label, 0) + 1
            kept.append(sample)
    return kept


def _optimizer(model: PixelClassifier, args: argparse.Namespace) -> torch.optim.Optimizer:
    head = list(model.backbone.get_classifier().parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    return torch.optim.AdamW(
        [{"params": body, "lr": args.body_lr}, {"params": head, "lr": args.lr}],
        weight_decay=args.weight_decay,
    )


def _schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Objective:
    """The loss of a batch: the labels, mixed with the teachers' answers when there are any."""

    labels: nn.Module
    teachers: Teachers | None = None
    weight: float = 0.0
    temperature: float = 1.0

    def __call__(
        self, logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        loss = self.labels(logits, targets)
        if self.teachers is None:
            return loss
        taught = self.teachers.probabilities(inputs, self.temperature)
        soft = distillation_loss(logits, taught, self.temperature)
        return (1 - self.weight) * loss + self.weight * soft


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: Objective,
    device: torch.device,
    progress: Any,
    ema: Any = None,
) -> dict[str, float]:
    model.train()
    total, correct, loss_sum = 0, 0, 0.0
    for inputs, targets in progress(loader):
        inputs = inputs.to(device, non_blocking=True, memory_format=torch.channels_last)
        targets = targets.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(inputs)
            loss = loss_fn(logits, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model, step=scheduler.last_epoch)  # warm-up needs the step
        total += len(targets)
        correct += int((logits.argmax(1) == targets).sum())
        loss_sum += loss.item() * len(targets)
    return {"train_loss": loss_sum / total, "train_accuracy": correct / total}


def _progress(desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda it: it
    return lambda it: tqdm(it, desc=desc, leave=False)


def _plot_curves(rows: list[dict[str, float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [r["epoch"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["train_loss"] for r in rows], label="train loss")
    left.legend()
    right.plot(epochs, [r["train_accuracy"] for r in rows], label="train accuracy")
    right.plot(epochs, [r["val_accuracy"] for r in rows], label="val accuracy")
    right.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class RunLog:
    """summary.csv rows, and MLflow when available and wanted."""

    def __init__(self, folder: Path, args: argparse.Namespace) -> None:
        self.folder = folder
        self.rows: list[dict[str, float]] = []
        self.mlflow = None
        if args.mlflow:
            try:
                import mlflow
            except ImportError:
                logger.info("mlflow is not installed; logging to %s only", folder)
            else:
                import os

                if not os.environ.get("MLFLOW_TRACKING_URI"):
                    # A local file store needs no server; mlflow-skinny has no SQL backend.
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                    mlflow.set_tracking_uri((args.out / "mlruns").resolve().as_uri())
                mlflow.set_experiment("smartbin")
                mlflow.start_run(run_name=folder.name)
                mlflow.log_params({k: str(v) for k, v in vars(args).items()})
                self.mlflow = mlflow

    def epoch(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        with (self.folder / "summary.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(self.rows)
        if self.mlflow:
            self.mlflow.log_metrics(
                {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
            )

    def finish(self, metrics: dict[str, float]) -> None:
        _plot_curves(self.rows, self.folder / "curves.png")
        if self.mlflow:
            self.mlflow.log_metrics(metrics)
            for name in ("curves.png", "confusion_test.png", "report.json", "split.json"):
                if (self.folder / name).exists():
                    self.mlflow.log_artifact(str(self.folder / name))
            self.mlflow.end_run()


def load_split(args: argparse.Namespace) -> tuple[list[str], dict[str, Any], Split]:
    image_set = load_source(args.data)
    if args.split:
        manifest = json.loads(args.split.read_text())
    else:
        manifest = make_split_manifest(image_set, seed=args.split_seed)
    sides = {
        name: _limit(select(image_set, manifest, name), args.limit_per_class) for name in SPLITS
    }
    return image_set.classes, manifest, Split(**sides)


def choose_device(requested: str) -> torch.device:
    """``auto`` takes CUDA when present and the CPU otherwise."""
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_student(
    args: argparse.Namespace, classes: list[str], spec: Preprocessing, fingerprint: str
) -> PixelClassifier:
    """The model to train: ImageNet (or random) weights, or ``--init``'s checkpoint."""
    if args.weights is None and not args.hub_pretrained and args.init is None:
        logger.warning("no pretrained weights given: %s starts from random weights", args.arch)
    model = create_classifier(args.arch, len(classes), spec, args.weights, args.hub_pretrained)
    if args.init:
        start = load_checkpoint(args.init, classes, fingerprint)
        trained = (start["arch"], start["preprocessing"]["input_size"])
        if trained != (args.arch, spec.input_size):
            raise ValueError(
                f"{args.init} is {trained[0]} at {trained[1]} px, this run trains {args.arch} "
                f"at {spec.input_size} px: pass --arch {trained[0]} --img-size {trained[1]}"
            )
        model.load_state_dict(start["state_dict"])
    return model


def train_loader(
    samples: list[Sample], size: int, args: argparse.Namespace, cuda: bool
) -> DataLoader:
    return DataLoader(
        TrainImages(samples, size),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=len(samples) > args.batch_size,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        pin_memory=cuda,
    )


@dataclass
class Best:
    """The epoch with the best val accuracy so far, and its weights."""

    accuracy: float = -1.0
    epoch: int = 0
    state: dict[str, torch.Tensor] | None = None


def fit(
    model: PixelClassifier,
    loader: DataLoader,
    val: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Objective,
    device: torch.device,
    log: RunLog,
    args: argparse.Namespace,
) -> Best:
    """Train up to ``args.epochs``, stopping early on val accuracy or the time limit; the model
    is left with the best epoch's weights."""
    optimizer = _optimizer(model, args)
    scheduler = _schedule(
        optimizer, args.epochs * len(loader), warmup=args.warmup_epochs * len(loader)
    )
    ema = ModelEmaV3(model, decay=args.ema_decay, use_warmup=True) if args.ema_decay else None
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else math.inf
    best = Best()
    for epoch in range(1, args.epochs + 1):
        started = time.time()
        progress = _progress(f"epoch {epoch}/{args.epochs}")
        row = train_one_epoch(model, loader, optimizer, scheduler, loss_fn, device, progress, ema)
        evaluated = ema.module if ema is not None else model
        val_probs = predict(evaluated, val[0], device)
        row.update(
            epoch=epoch,
            val_accuracy=float((val_probs.argmax(1) == val[1].numpy()).mean()),
            seconds=time.time() - started,
        )
        log.epoch(row)
        logger.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})
        if row["val_accuracy"] > best.accuracy:
            state = {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}
            best = Best(row["val_accuracy"], epoch, state)
        elif epoch - best.epoch >= args.patience:
            logger.info("no better val accuracy for %d epochs: stopping", args.patience)
            break
        if time.time() > deadline:
            logger.info("time limit of %s minutes reached: stopping", args.max_minutes)
            break
    if best.state is not None:  # None only if no epoch ran, which parse_args rules out
        model.load_state_dict(best.state)
    return best


def evaluate_sides(
    model: PixelClassifier,
    split: Split,
    spec: Preprocessing,
    classes: list[str],
    device: torch.device,
    folder: Path,
    kind: str = "float",
) -> dict[str, dict[str, Any]]:
    """Reports for val and test, with their confusion pictures (titled ``kind``) in the run
    folder."""
    reports = {}
    for name, samples in (("val", split.val), ("test", split.test)):
        inputs, targets = eval_tensor(samples, spec)
        probabilities = predict(model, inputs, device)
        reports[name] = classification_report(probabilities, targets.numpy(), classes)
        plot_confusion(reports[name], classes, folder / f"confusion_{name}.png", f"{kind} {name}")
    (folder / "report.json").write_text(json.dumps(reports, indent=1))
    return reports


def run(args: argparse.Namespace) -> Path:
    """Train, evaluate on val and test, write the run folder; returns the checkpoint path."""
    torch.manual_seed(args.seed)
    device = choose_device(args.device)
    classes, manifest, split = load_split(args)
    spec = default_preprocessing(args.arch, args.img_size)
    folder = args.out / (args.name or f"{args.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "args.yaml").write_text(yaml.safe_dump({k: _plain(v) for k, v in vars(args).items()}))
    (folder / "split.json").write_text(json.dumps(manifest, indent=1))
    logger.info(
        "classes %s; train %d, val %d, test %d images; %s on %s",
        classes,
        len(split.train),
        len(split.val),
        len(split.test),
        args.arch,
        device,
    )

    fingerprint = manifest["fingerprint"]
    model = build_student(args, classes, spec, fingerprint)
    # Channels-last runs the depthwise convolutions a third faster on CPU (and suits GPUs too).
    model.to(device, memory_format=torch.channels_last)
    teachers = None
    if args.teacher:
        teachers = Teachers([load_checkpoint(p, classes, fingerprint) for p in args.teacher])
        teachers.to(device, memory_format=torch.channels_last)
    loss_fn = Objective(
        nn.CrossEntropyLoss(label_smoothing=args.label_smoothing),
        teachers,
        args.distill_weight,
        args.distill_temperature,
    )
    log = RunLog(folder, args)
    loader = train_loader(split.train, spec.input_size, args, device.type == "cuda")
    if args.qat:
        start_rounding(model, attach_fake_quant(model), loader, device)
    best = fit(model, loader, eval_tensor(split.val, spec), loss_fn, device, log, args)

    kind = "simulated int8" if args.qat else "float"
    reports = evaluate_sides(model, split, spec, classes, device, folder, kind)
    checkpoint = folder / "checkpoint.pt"
    torch.save(
        {
            "arch": args.arch,
            "labels": classes,
            "preprocessing": spec.to_dict(),
            "state_dict": plain_state_dict(model),
            "split": manifest,
            "data": args.data,
            "best_epoch": best.epoch,
            "metrics": {
                n: {k: r[k] for k in ("accuracy", "macro_f1", "ece")} for n, r in reports.items()
            },
        },
        checkpoint,
    )
    log.finish({"best_val_accuracy": best.accuracy, "test_accuracy": reports["test"]["accuracy"]})
    logger.info(
        "best epoch %d: val %.4f, test %.4f -> %s",
        best.epoch,
        best.accuracy,
        reports["test"]["accuracy"],
        checkpoint,
    )
    return checkpoint


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run(parse_args(argv))


if __name__ == "__main__":
    main()
