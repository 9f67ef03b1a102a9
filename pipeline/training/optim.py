"""Optimizers and learning-rate schedules, chosen by name.

``build_optimizer(model, tcfg)``: any of timm's optimizers (``train.optimizer``), over parameter groups that
carry the backbone's lr multiplier and timm's layer-wise lr decay (``train.layer_decay``).
``SCHEDULERS[name](optimizer, tcfg, steps_per_epoch, higher_is_better)``: every schedule but ``plateau`` is
a per-step multiplier of each group's lr (``lr_lambda``: linear warm-up, then cosine, cosine restarts, steps
or constant); ``plateau`` cuts the lr when the validation score stalls (stepped once per epoch with the score).
They stay ours rather than timm's schedulers: the per-step multiplier is what resume, the lr finder and the
EMA warm-up count in, and its behaviour tests pin it.
"""
from __future__ import annotations

import math

import torch

from pipeline.registry import Registry

SCHEDULERS = Registry("train.scheduler")
COMMON = ("adam", "adamw", "sgd")  # known without importing timm (config checks stay fast)


class TimmOptimizers:
    """``train.optimizer`` names: every optimizer ``timm.optim.list_optimizers()`` knows (adam, adamw, sgd,
    lamb, lion, adan, nadamw, ...), built by ``timm.optim.create_optimizer_v2``, and our own, registered
    as ``@OPTIMIZERS.register(name)`` on a ``(param_groups, tcfg) -> optimizer`` builder."""

    key = "train.optimizer"

    def __init__(self):
        self.own: dict = {}

    def register(self, name: str):
        def add(fn):
            self.own[name] = fn
            return fn

        return add

    def _names(self) -> list[str]:
        from timm.optim import list_optimizers

        return [*self.own, *list_optimizers()]

    def check(self, name: str) -> str:
        if name in COMMON or name in self.own or name in self._names():
            return name
        raise ValueError(f"unknown value; allowed: {', '.join(self._names())} (timm.optim.list_optimizers())")

    def __contains__(self, name: object) -> bool:
        return name in COMMON or name in self._names()

    def __iter__(self):
        return iter(self._names())


OPTIMIZERS = TimmOptimizers()


def param_groups(model, tcfg: dict) -> list[dict]:
    """The backbone's trainable parameters at ``lr * backbone_lr_mult`` (with ``layer_decay``: each of timm's
    layer groups of the backbone scaled by ``layer_decay ** (layers above it)``, the last at 1), and the pool
    and heads at ``lr``."""
    lr, mult, decay = tcfg["lr"], tcfg["backbone_lr_mult"], tcfg["layer_decay"]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    if decay is None:
        backbone = [p for p in model.backbone.parameters() if p.requires_grad]
        return [{"params": backbone, "lr": lr * mult}, {"params": rest, "lr": lr}]
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model.backbone, weight_decay=tcfg["weight_decay"], layer_decay=decay,
                                      weight_decay_exclude_1d=False)
    for g in groups:
        g["lr"] = lr * mult * g.pop("lr_scale", 1.0)
    return [*groups, {"params": rest, "lr": lr}]


def build_optimizer(model, tcfg: dict):
    """timm's optimizer of that name over ``param_groups``; ``optimizer_args`` go to its constructor."""
    from timm.optim import create_optimizer_v2

    name = tcfg["optimizer"]
    if name in OPTIMIZERS.own:
        return OPTIMIZERS.own[name](param_groups(model, tcfg), tcfg)
    if name == "sgd" and not tcfg["momentum"]:
        name = "momentum"  # plain SGD: torch refuses Nesterov (timm's "sgd") without momentum
    return create_optimizer_v2(param_groups(model, tcfg), opt=name, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"],
                               momentum=tcfg["momentum"], filter_bias_and_bn=False, **(tcfg["optimizer_args"] or {}))


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
