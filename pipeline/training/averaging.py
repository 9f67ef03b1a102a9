"""Weight averaging: an exponential moving average of the weights (EMA, timm's ``ModelEmaV3``), kept
beside the model and evaluated/saved instead of the raw weights when ``train.ema`` is on. (SWA uses
torch's ``AveragedModel`` directly in the trainer.)"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.utils.model_ema import ModelEmaV3


def warmup_steps(setting, total_updates: int) -> int:
    """``train.ema_warmup``: "auto" = a tenth of the run's optimizer steps; an integer = that many; 0 = none."""
    return max(1, round(total_updates / 10)) if setting == "auto" else int(setting)


class ModelEma(ModelEmaV3):
    """timm's ``ModelEmaV3`` (every floating-point tensor of the state dict lerped in one foreach kernel,
    the others copied; bf16 EMA weights stochastically rounded), with our warm-up of the decay and our
    own update count (resume restores it).

    The decay warms up over ``warmup`` optimizer steps: ``min(decay, (1 + u) / (c + u))`` at update u, with
    c chosen so that the target decay is reached exactly at update ``warmup`` (timm's old 10 is the case
    warmup = 890 for decay 0.99, more steps than a short run has, so its EMA never took effect; V3's own
    ``use_warmup`` curve, ``1 - (1 + u / gamma) ** -power``, has no step at which it arrives). With
    ``warmup`` = 0 the target decay applies from the first update."""

    def __init__(self, model: nn.Module, decay: float, warmup: int = 0):
        super().__init__(model, decay=decay)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.warmup = warmup
        self.updates = 0

    def horizon_warning(self, total_updates: int) -> str:
        """A warning when the average spans more than half the run (1 / (1 - decay) steps): the EMA weights
        then stay a blend with the initial ones (the demo's 108 steps at 0.99 scored 0.15 against 0.98 at 0.9)."""
        span = 1 / (1 - self.decay)
        if span <= total_updates / 2:
            return ""
        return (f"; WARNING: decay {self.decay} averages over ~{span:.0f} steps, more than half of this run's "
                f"{total_updates}: the EMA weights stay close to the initial ones; use train.ema_decay <= "
                f"{1 - 2 / max(total_updates, 3):.3g}")

    def decay_at(self, updates: int) -> float:
        if self.warmup <= 0:
            return self.decay
        c = (1 + self.warmup) / self.decay - self.warmup
        return min(self.decay, (1 + updates) / (c + updates))

    def get_decay(self, step: int | None = None) -> float:  # (timm's hook: the decay at update ``step``)
        return self.decay_at(self.updates if step is None else step)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None):
        self.updates += 1
        super().update(model, step=self.updates if step is None else step)
