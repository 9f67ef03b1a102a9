"""Optimizers and learning-rate schedules, chosen by name.

``build_optimizer(model, tcfg)``: any of timm's optimizers (``train.optimizer``), over parameter groups that
carry the backbone's lr multiplier and timm's layer-wise lr decay (``train.layer_decay``).
``SCHEDULERS[name](optimizer, tcfg, steps_per_epoch, higher_is_better)``: every schedule but ``plateau`` is
a per-step multiplier of each group's lr (``lr_lambda``: linear warm-up, then cosine, cosine restarts, steps
or constant); ``plateau`` cuts the lr when the validation score stalls (stepped once per epoch with the score).
``timm.<name>`` is any of timm's schedulers (``TimmSchedule``: cosine with cycles, tanh, poly, wsd, rsqrt,
multistep, ..., stepped per update). The defaults stay ours: their per-step multipliers are pinned by
behaviour tests and the demo's figures, and timm's warm-up starts from ``warmup_lr`` rather than ramping
``(s + 1) / warm`` (``tests/test_train.py`` compares the two).
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


def param_groups(model, tcfg) -> list[dict]:
    """The backbone's trainable parameters at ``lr * backbone_lr_mult`` (with ``layer_decay``: each of timm's
    layer groups of the backbone scaled by ``layer_decay ** (layers above it)``, the last at 1), and the pool
    and heads at ``lr``."""
    lr, mult, decay = tcfg.lr, tcfg.backbone_lr_mult, tcfg.layer_decay
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    if decay is None:
        backbone = [p for p in model.backbone.parameters() if p.requires_grad]
        return [{"params": backbone, "lr": lr * mult}, {"params": rest, "lr": lr}]
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model.backbone, weight_decay=tcfg.weight_decay, layer_decay=decay,
                                      weight_decay_exclude_1d=False)
    for g in groups:
        g["lr"] = lr * mult * g.pop("lr_scale", 1.0)
    return [*groups, {"params": rest, "lr": lr}]


def build_optimizer(model, tcfg):
    """timm's optimizer of that name over ``param_groups``; ``optimizer_args`` go to its constructor."""
    from timm.optim import create_optimizer_v2

    name = tcfg.optimizer
    if name in OPTIMIZERS.own:
        return OPTIMIZERS.own[name](param_groups(model, tcfg), tcfg)
    if name == "sgd" and not tcfg.momentum:
        name = "momentum"  # plain SGD: torch refuses Nesterov (timm's "sgd") without momentum
    return create_optimizer_v2(param_groups(model, tcfg), opt=name, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                               momentum=tcfg.momentum, filter_bias_and_bn=False, **(tcfg.optimizer_args or {}))


def lr_lambda(tcfg, steps_per_epoch: int):
    """Multiplier of the base lr at optimizer step ``s`` (warm-up, then the chosen schedule)."""
    total = max(1, tcfg.epochs * steps_per_epoch)
    warm = tcfg.warmup_epochs * steps_per_epoch
    floor = tcfg.min_lr_ratio
    kind = tcfg.scheduler

    def f(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if kind == "cosine":
            t = (s - warm) / max(1, total - warm)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if kind == "restarts":
            cycle = max(1, tcfg.cycle_epochs or tcfg.epochs) * steps_per_epoch
            t = ((s - warm) % cycle) / cycle
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if kind == "step":
            epoch = s // steps_per_epoch
            return max(floor, tcfg.gamma ** sum(epoch >= m for m in tcfg.milestones))
        return 1.0

    return f


def _per_step(opt, tcfg, steps_per_epoch: int, higher_is_better: bool):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg, steps_per_epoch))


for _name in ("cosine", "restarts", "step", "none"):
    SCHEDULERS.register(_name)(_per_step)


@SCHEDULERS.register("plateau")
def plateau(opt, tcfg, steps_per_epoch: int, higher_is_better: bool):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max" if higher_is_better else "min",
                                                      factor=tcfg.gamma, patience=tcfg.patience,
                                                      min_lr=[g["lr"] * tcfg.min_lr_ratio for g in opt.param_groups])


# timm's schedulers (timm.scheduler.create_scheduler_v2), as ``train.scheduler: timm.<name>``
TIMM_SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "wsd", "rsqrt", "constant", "plateau")


class TimmSchedule:
    """One of timm's schedulers behind the torch interface the loop steps: ``step()`` after every optimizer
    step (timm's ``step_update``, per update), or ``step(score)`` once per epoch for ``timm.plateau``.
    The train keys map onto timm's: ``epochs``, ``warmup_epochs`` (a prefix: the schedule's own length is
    ``epochs - warmup_epochs``, so the run ends after ``epochs``, as ours), ``min_lr_ratio`` (x the lr),
    ``gamma`` (decay rate), ``milestones``, ``patience``; ``train.scheduler_args`` passes any other ``create_scheduler_v2``
    argument (``{cycle_limit: 3, cycle_mul: 2}``, ``{decay_epochs: 0.3}`` for wsd, ...)."""

    def __init__(self, opt, name: str, tcfg, steps_per_epoch: int, higher_is_better: bool):
        from timm.scheduler import create_scheduler_v2

        self.per_batch = name != "plateau"
        args = dict(sched=name, num_epochs=max(1, tcfg.epochs - tcfg.warmup_epochs), warmup_epochs=tcfg.warmup_epochs,
                    warmup_prefix=True,
                    min_lr=tcfg.lr * tcfg.min_lr_ratio, warmup_lr=tcfg.lr * 0.01, decay_rate=tcfg.gamma,
                    decay_milestones=list(tcfg.milestones), patience_epochs=tcfg.patience,
                    plateau_mode="max" if higher_is_better else "min", step_on_epochs=not self.per_batch,
                    updates_per_epoch=steps_per_epoch)
        self.timm, _ = create_scheduler_v2(opt, **{**args, **(tcfg.scheduler_args or {})})
        self.updates = self.epochs = 0

    def step(self, score: float | None = None):
        if self.per_batch:
            self.updates += 1
            self.timm.step_update(self.updates)
        else:
            self.epochs += 1
            self.timm.step(self.epochs, score)

    def state_dict(self) -> dict:
        return {"timm": self.timm.state_dict(), "updates": self.updates, "epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.timm.load_state_dict(state["timm"])
        self.updates, self.epochs = state["updates"], state["epochs"]


def _timm(name: str):
    return lambda opt, tcfg, steps_per_epoch, higher_is_better: TimmSchedule(opt, name, tcfg, steps_per_epoch,
                                                                           higher_is_better)


for _name in TIMM_SCHEDULERS:
    SCHEDULERS.register(f"timm.{_name}")(_timm(_name))


def steps_each_batch(sched) -> bool:
    """Per-step schedules advance after every optimizer step; plateau once per epoch with the score."""
    return getattr(sched, "per_batch", not isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau))
