"""Weight averaging: an exponential moving average of the weights (EMA), kept beside the model
and evaluated/saved instead of the raw weights when ``train.ema`` is on. (SWA uses torch's
``AveragedModel`` directly in the trainer.)"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ModelEma(nn.Module):
    """Exponential moving average of a model's weights (buffers copied); decay warms up early on."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        floats_e, floats_m = [], []
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                floats_e.append(e)
                floats_m.append(m.detach())
            else:
                e.copy_(m)
        if floats_e:
            torch._foreach_lerp_(floats_e, floats_m, 1 - d)  # e = d * e + (1 - d) * m, one kernel per group
