"""Optimisers and per-iteration learning-rate schedules, built from ``cfg.optim``.

Weight decay applies to weight matrices and convolution kernels only: biases and
normalisation parameters (every parameter with fewer than two dimensions) are not
decayed, as is usual for networks with batch norm (decaying a BN scale only fights the
normalisation). With ``weight_decay: 0`` there is a single parameter group.

Schedules are one ``LambdaLR`` stepped after every optimiser step. With warmup, the lr
factor rises linearly from ``warmup_factor`` (iteration 0) to 1 (iteration
``warmup_iters``); the schedule then runs over the remaining
``total_iters - warmup_iters`` iterations, as in torchvision's segmentation reference:

- poly: ``(1 - t / T) ** power``
- cosine: ``0.5 * (1 + cos(pi * t / T))``
- constant: ``1``

with ``t`` the iterations since warmup and ``T = total_iters - warmup_iters``. Past the
end the factor stays at its final value (0 for poly and cosine).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from seg.config import Config, OptimConfig
from seg.errors import ConfigError

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_scheduler", "lr_factor"]


def _sgd(params: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _adam(params: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999))  # L2 added to the gradient


def _adamw(params: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, 0.999))  # decoupled decay


OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
}


def build_optimizer(cfg: OptimConfig | Config, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.name`` over the model's trainable parameters.

    Parameter groups are ``decay`` (``weight_decay`` = ``cfg.weight_decay``) and
    ``no_decay`` (biases and norm parameters, ``weight_decay`` = 0); each group carries
    its ``name``.
    """
    cfg = cfg.optim if isinstance(cfg, Config) else cfg
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name '{cfg.name}' is unknown. Valid names: {', '.join(OPTIMIZERS)}")
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    if cfg.weight_decay > 0:
        groups = [{"name": "decay", "params": decay, "weight_decay": cfg.weight_decay},
                  {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
        groups = [group for group in groups if group["params"]]
    else:
        groups = [{"name": "all", "params": decay + no_decay, "weight_decay": 0.0}]
    return OPTIMIZERS[cfg.name](groups, cfg)


SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "poly": lambda progress, power: (1.0 - progress) ** power,
    "cosine": lambda progress, power: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "constant": lambda progress, power: 1.0,
}


def lr_factor(iteration: int, cfg: OptimConfig, total_iters: int) -> float:
    """The lr multiplier at ``iteration`` (0-based): warmup, then the named schedule."""
    warmup = cfg.warmup_iters
    if iteration < warmup:
        alpha = iteration / warmup
        return cfg.warmup_factor * (1.0 - alpha) + alpha
    progress = min(1.0, (iteration - warmup) / (total_iters - warmup))
    return SCHEDULES[cfg.schedule](progress, cfg.power)


def build_scheduler(cfg: OptimConfig | Config, optimizer: torch.optim.Optimizer, total_iters: int) -> LambdaLR:
    """A ``LambdaLR`` over ``total_iters`` optimiser steps; call ``step()`` after each one.

    Raises ConfigError when warmup would not end before training does.
    """
    cfg = cfg.optim if isinstance(cfg, Config) else cfg
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule '{cfg.schedule}' is unknown. Valid: {', '.join(SCHEDULES)}")
    if total_iters < 1:
        raise ValueError(f"total_iters must be >= 1, got {total_iters}")
    if cfg.warmup_iters >= total_iters:
        raise ConfigError(f"optim.warmup_iters ({cfg.warmup_iters}) must be smaller than the number of "
                          f"training iterations ({total_iters}): lower it or train longer")

    # a plain function, not a callable object: LambdaLR then keeps it out of state_dict, so a
    # resumed run takes its schedule from the config rather than from the checkpoint
    def factor(iteration: int) -> float:
        return lr_factor(iteration, cfg, total_iters)

    return LambdaLR(optimizer, factor)
