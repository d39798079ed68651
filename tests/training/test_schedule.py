"""The learning-rate schedule (timm's cosine with linear warm-up, stepped per update) for both
parameter groups, and the update count the weight average warms up with."""

from __future__ import annotations

import math

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn

from smartbin.preprocessing import Preprocessing
from trainer.config import TrainConfig
from trainer.model import create_classifier
from trainer.train import Objective, lr_schedule, make_optimizer, train_one_epoch


def group_lrs(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    body, head = (group["lr"] for group in optimizer.param_groups)
    return body, head


def test_lr_warms_up_then_decays_to_zero_in_both_groups() -> None:
    model = create_classifier("mobilenetv2_100", 3, Preprocessing(input_size=64, resize_size=64))
    optimizer = make_optimizer(model, TrainConfig(data="photos", lr=1e-3, body_lr=3e-4))
    head = {id(p) for p in model.head().parameters()}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == head
    scheduler = lr_schedule(optimizer, updates=20, warmup_updates=5)

    lrs = [group_lrs(optimizer)]  # the learning rates of the first update
    for done in range(1, 20):
        scheduler.step_update(done)
        lrs.append(group_lrs(optimizer))
    heads = [head for _, head in lrs]
    assert heads[0] == pytest.approx(1e-3 / 5)
    assert all(a < b for a, b in zip(heads[:5], heads[1:6], strict=True))  # warming up
    assert heads[5] == pytest.approx(1e-3)  # the peak, right after the warm-up
    assert all(a > b for a, b in zip(heads[5:], heads[6:], strict=False))  # decaying
    assert heads[-1] < 0.03 * 1e-3
    assert heads[12] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert all(body == pytest.approx(0.3 * head) for body, head in lrs)
    scheduler.step_update(20)
    assert group_lrs(optimizer) == (0.0, 0.0)


def test_without_warm_up_the_first_update_is_at_the_peak() -> None:
    weight = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [weight], "lr": 0.01}])
    lr_schedule(optimizer, updates=4, warmup_updates=0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize("warmup", [4, 5, -1])
def test_a_warm_up_without_room_to_decay_is_refused(warmup: int) -> None:
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=0.01)
    with pytest.raises(ValueError, match="leave no room"):
        lr_schedule(optimizer, updates=4, warmup_updates=warmup)


def test_epochs_carry_the_update_count_to_the_schedule_and_the_average() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(64, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = lr_schedule(optimizer, updates=6, warmup_updates=2)
    ema = ModelEmaV3(model, decay=0.998, use_warmup=True)
    loss, cpu = Objective(nn.CrossEntropyLoss()), torch.device("cpu")
    batch = [(torch.rand(2, 3, 4, 4), torch.tensor([0, 2]))]

    row, updates = train_one_epoch(model, batch, optimizer, scheduler, loss, cpu, ema=ema)
    assert updates == 1 and row["lr"] == pytest.approx(0.005)  # 1/2 of the peak: warming up
    # The average starts as a copy of the model (timm's decay is 0 at the first update)...
    for averaged, trained in zip(ema.module.parameters(), model.parameters(), strict=True):
        assert torch.equal(averaged, trained)

    # ...and then follows it at the decay of the count of updates (1 - 2^(-2/3) at the second).
    before = [p.detach().clone() for p in ema.module.parameters()]
    row, updates = train_one_epoch(
        model, batch, optimizer, scheduler, loss, cpu, ema=ema, updates=updates
    )
    assert updates == 2 and row["lr"] == pytest.approx(0.0075)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # the third update's: the peak
    decay = 1 - 2 ** (-2 / 3)
    pairs = zip(ema.module.parameters(), model.parameters(), strict=True)
    for (averaged, trained), old in zip(pairs, before, strict=True):
        assert torch.allclose(averaged, decay * old + (1 - decay) * trained)
