"""Building a fold's network from the config: backbone and heads (``build_model``), the starting weights
``model.init`` names (our jigsaw backbone or a fold checkpoint, per fold with ``{fold}``), and the check
that those weights never saw the fold's validation rows (``init_leak``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch.nn as nn

from pipeline.errors import InputError
from pipeline.training.checkpoint import Checkpoint
from pipeline.training.models import Head, Net, create_backbone, head_options

if TYPE_CHECKING:
    from pipeline.config.schema import Config


def init_path(cfg: Config, fold=None) -> str | None:
    """``model.init`` for one fold: ``{fold}`` in the path becomes the fold (0, 1, ..., full), so each fold can
    start from its own fold's checkpoint of an earlier experiment."""
    init = cfg.model.init
    return init.format(fold=fold) if init else init  # (the schema allows no other placeholder)


def init_leak(cfg: Config, folds, folds_hash: str) -> str | None:
    """A LEAKY mark when a fold starts from a fold checkpoint that trained on its validation rows: another
    fold's model, the all-data model, or a model of another folds file. Label-free weights (jigsaw) and each
    fold's own checkpoint of the same folds are clean."""
    if not cfg.model.init:
        return None
    bad = []
    for k in folds:
        path = Path(init_path(cfg, k))
        if not path.exists() or k == "full":
            continue
        ck = Checkpoint.describes_fold(path)
        if ck is None:
            continue  # not a fold model (a backbone state dict, our jigsaw weights)
        if str(ck["fold"]) != str(k) or ck["folds_hash"] != folds_hash:
            bad.append(f"fold {k} <- {path} (fold {ck['fold']}" + (", other folds" if ck["folds_hash"] != folds_hash
                                                                  else "") + ")")
    if not bad:
        return None
    return (f"LEAKY: model.init starts fold(s) from a model that trained on their validation rows ({'; '.join(bad[:3])}); "
            "its CV is optimistic: use model.init=.../fold{fold}/best.pt with the same folds")


def build_model(cfg: Config, heads: list[Head], fold=None, init: str | None = "model.init") -> Net:
    """The config's network; its backbone starts from ``init`` (default: ``model.init`` for this fold)."""
    m = cfg.model
    backbone = create_backbone(m.backbone, cfg.data.in_chans, cfg.data.image_size, m.get("pretrained"))
    net = Net(backbone, heads, m.pool, m.bnneck, m.dropout, *head_options(m))
    path = init_path(cfg, fold) if init == "model.init" else init
    if path:
        report = load_backbone_weights(net.backbone, path)
        print(f"[model] {report}", flush=True)
    return net


@dataclass
class LoadReport:
    path: str
    matched: int
    total: int
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    def __str__(self) -> str:
        s = f"loaded {self.matched}/{self.total} backbone tensors from {self.path}"
        if self.missing:
            s += f"; missing {len(self.missing)} (e.g. {', '.join(self.missing[:3])})"
        if self.unexpected:
            s += f"; ignored {len(self.unexpected)} unexpected (e.g. {', '.join(self.unexpected[:3])})"
        if self.mismatched:
            s += f"; shape mismatch {len(self.mismatched)} (e.g. {', '.join(self.mismatched[:3])})"
        return s


def load_backbone_weights(backbone: nn.Module, path: str | Path, strict_min: float = 0.5) -> LoadReport:
    """Load a local state dict into ``backbone``; prefixes ``module.``/``backbone.`` are stripped.
    Refuses (naming the keys) when fewer than ``strict_min`` of the backbone's tensors match."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"model.init: weights file {path} does not exist (no download is ever attempted); "
                         "run `make pretrain` or name a local file.")
    state = Checkpoint.weights_in(path)
    clean = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        clean[k] = v
    own = backbone.state_dict()
    matched = {k: v for k, v in clean.items() if k in own and own[k].shape == v.shape}
    mismatched = [k for k, v in clean.items() if k in own and own[k].shape != v.shape]
    report = LoadReport(str(path), len(matched), len(own), sorted(set(own) - set(matched)),
                        sorted(k for k in clean if k not in own), mismatched)
    if len(matched) < strict_min * len(own):
        raise InputError(f"model.init: {path} does not fit backbone {type(backbone).__name__}: {report}. "
                         "Was it saved from another model.backbone or in_chans?")
    backbone.load_state_dict(matched, strict=False)
    return report


