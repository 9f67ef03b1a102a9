"""Optimizers and learning-rate schedules, chosen by name from registries.

``OPTIMIZERS[name](param_groups, tcfg)`` and ``SCHEDULERS[name](optimizer, tcfg, steps_per_epoch,
higher_is_better)``. Every schedule but ``plateau`` is a per-step multiplier of the base lr
(``lr_lambda``: linear warm-up, then cosine, cosine restarts, steps or constant); ``plateau`` cuts
the lr when the validation score stalls (stepped once per epoch with the score).
"""
from __future__ import annotations

import math

import torch

from pipeline.registry import Registry

OPTIMIZERS = Registry("train.optimizer")
SCHEDULERS = Registry("train.scheduler")


@OPTIMIZERS.register("adam")
def adam(groups, tcfg: dict):
    return torch.optim.Adam(groups, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"], **(tcfg["optimizer_args"] or {}))


@OPTIMIZERS.register("adamw")
def adamw(groups, tcfg: dict):
    return torch.optim.AdamW(groups, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"], **(tcfg["optimizer_args"] or {}))


@OPTIMIZERS.register("sgd")
def sgd(groups, tcfg: dict):
    return torch.optim.SGD(groups, lr=tcfg["lr"], momentum=tcfg["momentum"], weight_decay=tcfg["weight_decay"],
                           nesterov=tcfg["momentum"] > 0, **(tcfg["optimizer_args"] or {}))


def lr_lambda(tcfg: dict, steps_per_epoch: int):
    """Multiplier of the base lr at optimizer step ``s`` (warm-up, then the chosen schedule)."""
    total = max(1, tcfg["epochs"] * steps_per_epoch)
    warm = tcfg["warmup_epochs"] * steps_per_epoch
    floor = tcfg["min_lr_ratio"]
    kind = tcfg["scheduler"]

    def f(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if kind == "cosine":
            t = (s - warm) / max(1, total - warm)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if kind == "restarts":
            cycle = max(1, tcfg["cycle_epochs"] or tcfg["epochs"]) * steps_per_epoch
            t = ((s - warm) % cycle) / cycle
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if kind == "step":
            epoch = s // steps_per_epoch
            return max(floor, tcfg["gamma"] ** sum(epoch >= m for m in tcfg["milestones"]))
        return 1.0

    return f


def _per_step(opt, tcfg: dict, steps_per_epoch: int, higher_is_better: bool):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg, steps_per_epoch))


for _name in ("cosine", "restarts", "step", "none"):
    SCHEDULERS.register(_name)(_per_step)


@SCHEDULERS.register("plateau")
def plateau(opt, tcfg: dict, steps_per_epoch: int, higher_is_better: bool):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max" if higher_is_better else "min",
                                                      factor=tcfg["gamma"], patience=tcfg["patience"],
                                                      min_lr=[g["lr"] * tcfg["min_lr_ratio"] for g in opt.param_groups])


def steps_each_batch(sched) -> bool:
    """Per-step schedules advance after every optimizer step; plateau once per epoch with the score."""
    return not isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
