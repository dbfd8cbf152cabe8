"""Optimisers (parameter groups, hyperparameters) and lr schedules against hand-computed values."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch
from torch import nn

from seg.config import Config, OptimConfig
from seg.errors import ConfigError
from seg.losses import build_loss
from seg.optim import build_optimizer, build_scheduler


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 19, 1))


def lr_curve(cfg: OptimConfig, total: int, steps: int | None = None) -> list[float]:
    """The lr used at iterations 0..steps-1 (read before each step, as training does)."""
    model = tiny_model()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, total)
    lrs = []
    for _ in range(total + 1 if steps is None else steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        assert all(group["lr"] == lrs[-1] for group in optimizer.param_groups)
        optimizer.step()
        scheduler.step()
    return lrs


def test_no_weight_decay_on_biases_and_norm_parameters() -> None:
    model = tiny_model()
    optimizer = build_optimizer(OptimConfig(weight_decay=1e-4), model)
    groups = {group["name"]: group for group in optimizer.param_groups}
    conv1, bn, conv2 = model[0], model[1], model[3]
    assert {id(p) for p in groups["decay"]["params"]} == {id(conv1.weight), id(conv2.weight)}
    assert {id(p) for p in groups["no_decay"]["params"]} == {id(conv1.bias), id(bn.weight), id(bn.bias),
                                                             id(conv2.bias)}
    assert groups["decay"]["weight_decay"] == 1e-4 and groups["no_decay"]["weight_decay"] == 0.0


def test_zero_weight_decay_gives_one_group_and_frozen_parameters_are_left_out() -> None:
    model = tiny_model()
    model[0].weight.requires_grad_(False)
    optimizer = build_optimizer(OptimConfig(weight_decay=0.0), model)
    assert len(optimizer.param_groups) == 1
    params = optimizer.param_groups[0]["params"]
    assert len(params) == 5 and all(p is not model[0].weight for p in params)


def test_optimizer_hyperparameters_come_from_the_config() -> None:
    sgd = build_optimizer(OptimConfig(name="sgd", lr=0.05, momentum=0.8, nesterov=True), tiny_model())
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["lr"] == 0.05 and sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"]
    adam = build_optimizer(OptimConfig(name="adam", lr=1e-3, momentum=0.5), tiny_model())
    assert type(adam) is torch.optim.Adam and adam.defaults["betas"] == (0.5, 0.999)
    adamw = build_optimizer(Config().with_overrides({"optim.name": "adamw", "optim.momentum": 0.95}), tiny_model())
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["betas"] == (0.95, 0.999)
    assert adamw.param_groups[0]["weight_decay"] == 5e-4


def test_unknown_optimizer_or_schedule_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="sgd, adam, adamw"):
        build_optimizer(dataclasses.replace(OptimConfig(), name="lamb"), tiny_model())
    optimizer = build_optimizer(OptimConfig(), tiny_model())
    with pytest.raises(ConfigError, match="poly, cosine, constant"):
        build_scheduler(dataclasses.replace(OptimConfig(), schedule="step"), optimizer, 10)


def test_poly_schedule_values() -> None:
    lrs = lr_curve(OptimConfig(lr=0.1, schedule="poly", power=0.9), total=10)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 * 0.5 ** 0.9)
    assert lrs[9] == pytest.approx(0.1 * 0.1 ** 0.9)
    assert lrs[10] == 0.0


def test_poly_with_warmup_values() -> None:
    cfg = OptimConfig(lr=1.0, schedule="poly", power=1.0, warmup_iters=4, warmup_factor=0.2)
    lrs = lr_curve(cfg, total=14)
    # linear warmup 0.2 -> 1 over 4 iterations, then poly over the remaining 10
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[9] == pytest.approx(0.5)
    assert lrs[13] == pytest.approx(0.1)
    assert lrs[14] == 0.0


def test_cosine_and_constant_values() -> None:
    lrs = lr_curve(OptimConfig(lr=0.2, schedule="cosine"), total=8)
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[2] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lrs[4] == pytest.approx(0.1)
    assert lrs[8] == pytest.approx(0.0, abs=1e-12)
    cosine_warm = lr_curve(OptimConfig(lr=1.0, schedule="cosine", warmup_iters=2, warmup_factor=0.5), total=6)
    assert cosine_warm[:3] == pytest.approx([0.5, 0.75, 1.0])
    assert cosine_warm[4] == pytest.approx(0.5)
    constant = lr_curve(OptimConfig(lr=0.3, schedule="constant", warmup_iters=3, warmup_factor=0.1), total=6)
    assert constant == pytest.approx([0.03, 0.12, 0.21, 0.3, 0.3, 0.3, 0.3])


def test_past_the_end_the_lr_stays_at_its_final_value() -> None:
    assert lr_curve(OptimConfig(lr=0.1, schedule="poly"), total=4, steps=8)[4:] == [0.0] * 4


def test_scheduler_state_dict_round_trip() -> None:
    cfg = OptimConfig(lr=0.1, schedule="poly", warmup_iters=3, warmup_factor=0.1)
    total = 12
    uninterrupted = lr_curve(cfg, total)

    model = tiny_model()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, total)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # as checkpoints are loaded

    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, total)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    resumed = []
    for _ in range(total + 1 - 5):
        resumed.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert resumed == pytest.approx(uninterrupted[5:])


def test_warmup_must_end_before_training_does() -> None:
    optimizer = build_optimizer(OptimConfig(), tiny_model())
    with pytest.raises(ConfigError, match="warmup_iters"):
        build_scheduler(OptimConfig(warmup_iters=10), optimizer, 10)
    with pytest.raises(ValueError, match="total_iters"):
        build_scheduler(OptimConfig(), optimizer, 0)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_each_optimizer_reduces_the_loss(name: str) -> None:
    torch.manual_seed(0)
    model = tiny_model()
    lr = 0.1 if name == "sgd" else 0.03
    cfg = OptimConfig(name=name, lr=lr, momentum=0.9, warmup_iters=2)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, 30)
    loss_fn = build_loss()
    image = torch.randn(2, 3, 8, 8)
    target = torch.where(image[:, 0] > 0, 3, 7)  # learnable from the input
    target[:, :2] = 255
    losses = []
    for _ in range(30):
        loss = loss_fn(model(image), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
