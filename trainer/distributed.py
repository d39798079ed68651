"""Training past one process: ``smartbin-train`` under ``torchrun``.

torchrun starts the processes (one per GPU, on one machine or several) and tells each its place
in the environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address. Every
process loads the data and computes the same deduplicated split (checked by its fingerprint),
trains on its own share of each epoch's training photos (``DistributedSampler``) in a
``DistributedDataParallel`` model, whose gradients are averaged over the processes at every
update, and sums its training figures with the others'. Rank 0 alone evaluates, decides whether
to stop and tells the others, and writes the run folder, ``summary.csv``, MLflow and the
checkpoint: the plain model's weights, as a single-process run saves them.

Outside torchrun, and with a world of one process, every function here gives its input back
unchanged: the single-process run does exactly what it did before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

T = TypeVar("T")
LrScaling = Literal["none", "linear", "sqrt"]


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (a single process by default)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Ranks:
        """The ranks torchrun sets; a single process where it set none."""
        if "RANK" not in environ or "WORLD_SIZE" not in environ:
            return cls()
        return cls(
            int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", "0"))
        )


def rank_device(requested: str, local_rank: int) -> torch.device:
    """The device of one of several processes: the GPU numbered by its ``LOCAL_RANK``, or the
    CPU (``auto`` takes the GPU where CUDA is present)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", local_rank)
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(
        f"--device {requested}: under torchrun each process takes the GPU of its LOCAL_RANK; "
        "pass --device auto, cuda or cpu"
    )


@contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Join the other processes for the block (NCCL on GPUs, gloo on the CPU), and leave the
    group after it; nothing for a single process."""
    if not ranks.distributed:
        yield
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process trains with others (a process group is up)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process is rank 0, the one that evaluates and writes (or the only one)."""
    return not active() or dist.get_rank() == 0


def lr_factor(scaling: LrScaling, processes: int) -> float:
    """How the learning rates follow the effective batch of ``processes`` times the batch
    size: ``none`` keeps the recipe's, ``linear`` multiplies them by the process count,
    ``sqrt`` by its square root."""
    return {"none": 1.0, "linear": float(processes), "sqrt": processes**0.5}[scaling]


def _tensor_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across(values: list[float]) -> list[float]:
    """Each value summed over the processes (the values themselves in a single process)."""
    if not active():
        return values
    summed = torch.tensor(values, dtype=torch.float64, device=_tensor_device())
    dist.all_reduce(summed)
    return [float(v) for v in summed.tolist()]


def from_main(value: T) -> T:
    """Rank 0's ``value`` on every process, so that all of them decide alike."""
    if not active():
        return value
    box: list[object] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def agree(value: str, what: str) -> None:
    """Raise, on every process, when the processes do not all hold the same ``value``.

    Raises:
        ValueError: naming each rank's value (machines with different copies of the data).
    """
    if not active():
        return
    values: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        held = ", ".join(f"rank {rank}: {held}" for rank, held in enumerate(values))
        raise ValueError(f"the processes differ in their {what} ({held}): is the data the same?")


def barrier() -> None:
    """Wait for every process (nothing in a single process)."""
    if active():
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when training with others, else ``model``.

    The wrapper shares the model's parameters, so the optimizer, the weight average and the
    checkpoint keep using the plain model (``unwrap``).
    """
    if not active():
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel wrapper (state_dict without
    ``module.``)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
