"""Head losses: a table per head kind (multiclass, binary, regression, vector, multilabel, position), class
weights, and the criterion that sums the heads.

Every loss returns one value per sample (so OHEM and mixing work on any of them). ``train.loss``
picks the main target heads' loss from ``LOSSES[kind]``; ``auto`` is the head kind's default (``tasks.HEAD_KINDS``); auxiliary
heads always use their kind's ``auto`` loss. Adding a loss: one function + one ``register`` line.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import InputError
from pipeline.registry import Registry
from pipeline.tasks import HEAD_KINDS
from pipeline.training.models import Head

LOSSES: dict[str, Registry] = {kind: Registry(f"train.loss for a {kind} head") for kind in HEAD_KINDS}


def _soft(logits, y, head: Head, opts: dict):
    soft = y if y.ndim == 2 else F.one_hot(y, head.out).float()
    if opts["label_smoothing"]:
        soft = soft * (1 - opts["label_smoothing"]) + opts["label_smoothing"] / head.out
    return soft


@LOSSES["multiclass"].register("ce")
def cross_entropy(logits, y, head: Head, opts: dict, cw=None):
    """Soft-target cross-entropy (label smoothing, mixed targets, class weights)."""
    soft = _soft(logits, y, head, opts)
    logp = logits.float().log_softmax(-1)
    return -(soft * logp * (cw if cw is not None else 1)).sum(-1)


@LOSSES["multiclass"].register("focal")
def focal(logits, y, head: Head, opts: dict, cw=None):
    soft = _soft(logits, y, head, opts)
    pt = (soft * logits.float().softmax(-1)).sum(-1)
    return (1 - pt).clamp(min=0).pow(opts["focal_gamma"]) * cross_entropy(logits, y, head, opts, cw)


def _binary_target(y, opts):
    y = y.float()
    return y * (1 - opts["label_smoothing"]) + 0.5 * opts["label_smoothing"] if opts["label_smoothing"] else y


@LOSSES["binary"].register("bce")
def bce(logits, y, head: Head, opts: dict, cw=None):
    loss = F.binary_cross_entropy_with_logits(logits.float().squeeze(-1), _binary_target(y, opts), reduction="none")
    return _class_weighted(loss, y, cw)


def _class_weighted(loss, y, cw):
    """Binary class weights [w0, w1] per row: w1 * y + w0 * (1 - y) (a soft target weighs in between)."""
    if cw is None:
        return loss
    t = y.float().reshape(loss.shape)
    return loss * (cw[1] * t + cw[0] * (1 - t))


@LOSSES["binary"].register("focal")
def binary_focal(logits, y, head: Head, opts: dict, cw=None):
    z, t = logits.float().squeeze(-1), _binary_target(y, opts)
    p = torch.sigmoid(z)
    pt = p * t + (1 - p) * (1 - t)
    return _class_weighted((1 - pt).pow(opts["focal_gamma"]) * F.binary_cross_entropy_with_logits(z, t, reduction="none"),
                           y, cw)


@LOSSES["multilabel"].register("bce")
def multilabel_bce(logits, y, head: Head, opts: dict, cw=None):
    """Binary cross-entropy of every label, averaged over the labels."""
    return F.binary_cross_entropy_with_logits(logits.float(), _binary_target(y, opts), reduction="none").mean(-1)


@LOSSES["multilabel"].register("asl")
def asymmetric(logits, y, head: Head, opts: dict, cw=None):
    """Asymmetric loss for label sets where most labels are absent from most rows (Ridnik et al., 2021): an
    absent label's term is down-weighted by p^gamma (``train.asl_gamma_neg``, easy negatives fade) and its
    probability shifted down by ``train.asl_clip`` (a negative below the clip costs nothing), while a present
    label keeps its full cross-entropy."""
    z, t = logits.float(), _binary_target(y, opts)
    p = torch.sigmoid(z)
    shifted = (p - opts["asl_clip"]).clamp(min=0)
    pos = t * F.logsigmoid(z)
    log_absent = F.logsigmoid(-z) if not opts["asl_clip"] else torch.log((1 - shifted).clamp(min=1e-8))
    neg = (1 - t) * shifted.pow(opts["asl_gamma_neg"]) * log_absent
    return -(pos + neg).mean(-1)


def _flat(logits, y):
    return logits.float().reshape(len(y), -1), y.float().reshape(len(y), -1)


def mse(logits, y, head: Head, opts: dict, cw=None):
    z, t = _flat(logits, y)
    return ((z - t) ** 2).mean(-1)


def mae(logits, y, head: Head, opts: dict, cw=None):
    z, t = _flat(logits, y)
    return (z - t).abs().mean(-1)


def smooth_l1(logits, y, head: Head, opts: dict, cw=None):
    z, t = _flat(logits, y)
    return F.smooth_l1_loss(z, t, reduction="none").mean(-1)


for _kind in ("regression", "vector"):
    LOSSES[_kind].register("mse")(mse)
    LOSSES[_kind].register("rmse")(mse)  # the square root is taken of the batch mean (Criterion)
    LOSSES[_kind].register("mae")(mae)
    LOSSES[_kind].register("smoothl1")(smooth_l1)


@LOSSES["position"].register("ce")
def position_ce(logits, y, head: Head, opts: dict, cw=None):
    """Jigsaw: for each of n positions, which of n tiles is there (mean cross-entropy over positions)."""
    n = int(round(math.sqrt(head.out)))
    return F.cross_entropy(logits.float().reshape(-1, n), y.long().reshape(-1), reduction="none").reshape(
        len(y), n).mean(-1)


def resolve(head: Head, name: str) -> str:
    return HEAD_KINDS[head.kind].default_loss if name == "auto" else LOSSES[head.kind].check(name)


def head_targets(heads: list[Head], df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The training target array of every head from the train table."""
    out = {}
    for h in heads:
        kind = HEAD_KINDS[h.kind]
        if kind.outputs == "classes":
            y = df[h.columns[0]].to_numpy()
            bad = (y < 0) | (y >= h.out)
            if bad.any():
                raise InputError(f"target column '{h.columns[0]}' has value {y[bad][0]!r} (row id "
                                 f"{df.index[bad][0]}) outside the declared classes 0..{h.out - 1}.")
            out[h.name] = y.astype(np.int64)
        elif kind.outputs == "columns":
            out[h.name] = df[h.columns].to_numpy(np.float32)
        else:
            out[h.name] = df[h.columns[0]].to_numpy(np.float32)
    return out


class HeadLoss(nn.Module):
    """Per-sample loss of one head, looked up in ``LOSSES[head.kind]``."""

    def __init__(self, head: Head, name: str, tcfg: dict, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.head, self.name = head, resolve(head, name)
        self.fn = LOSSES[head.kind][self.name]
        self.opts = {"label_smoothing": tcfg["label_smoothing"], "focal_gamma": tcfg["focal_gamma"],
                     "asl_gamma_neg": tcfg.get("asl_gamma_neg", 4.0), "asl_clip": tcfg.get("asl_clip", 0.05)}
        self.register_buffer("cw", class_weights if class_weights is not None else torch.empty(0))

    def forward(self, logits, y):
        return self.fn(logits, y, self.head, self.opts, self.cw if self.cw.numel() else None)


def distillation(logits, teacher_probs, temperature: float, per_label: bool = False):
    """Per-sample T^2 * KL(teacher_T || student_T): the teacher's probabilities and the student's logits
    both softened by the temperature T (Hinton et al.); T^2 keeps its gradient scale comparable. ``per_label``
    (a label set): each label's yes/no is its own two-class distribution, and the KLs are averaged."""
    t = float(temperature)
    if per_label:
        p = teacher_probs.float().clamp(1e-6, 1 - 1e-6)
        q = torch.sigmoid(torch.log(p / (1 - p)) / t)  # the teacher's logit, softened
        z = logits.float() / t
        kl = q * (torch.log(q.clamp_min(1e-8)) - F.logsigmoid(z)) + (1 - q) * (
            torch.log((1 - q).clamp_min(1e-8)) - F.logsigmoid(-z))
        return (t * t) * kl.mean(-1)
    q = torch.softmax(torch.log(teacher_probs.float().clamp_min(1e-8)) / t, dim=-1)
    logp = torch.log_softmax(logits.float() / t, dim=-1)
    return (t * t) * (q * (torch.log(q.clamp_min(1e-8)) - logp)).sum(-1)


class Margin(nn.Module):
    """The angular margin of a cosine head (``model.head``): the main head's logits are ``scale * cos``, and in
    training the true class's cosine becomes cos(theta + m) (ArcFace) or cos(theta) - m (CosFace) before the
    softmax, so a class must beat the others by the margin. Soft targets (mixup, pseudo-labels) move each
    class's cosine by its share of the target."""

    def __init__(self, kind: str, scale: float, margin: float):
        super().__init__()
        self.kind, self.scale, self.m = kind, float(scale), float(margin)
        self.cos_m, self.sin_m = math.cos(self.m), math.sin(self.m)
        # past theta = pi - m, cos(theta + m) would rise again: continue it as a straight line instead
        self.threshold, self.fallback = math.cos(math.pi - self.m), math.sin(math.pi - self.m) * self.m

    def forward(self, logits, y):
        cos = (logits.float() / self.scale).clamp(-1 + 1e-7, 1 - 1e-7)
        target = y.float() if y.ndim == 2 else F.one_hot(y.long(), cos.shape[1]).float()
        if self.kind == "cosface":
            return (cos - self.m * target) * self.scale
        phi = cos * self.cos_m - (1 - cos * cos).sqrt() * self.sin_m
        phi = torch.where(cos > self.threshold, phi, cos - self.fallback)
        return (cos + target * (phi - cos)) * self.scale


DEFAULT_MARGIN = {"arcface": 0.5, "cosface": 0.35}


def margin_for(model_cfg: dict) -> Margin | None:
    """The margin ``model.head`` asks for (None for a linear head)."""
    kind = model_cfg.get("head", "linear")
    if kind == "linear":
        return None
    m = model_cfg.get("head_margin")
    return Margin(kind, model_cfg.get("head_scale", 30.0), DEFAULT_MARGIN[kind] if m is None else m)


class Criterion(nn.Module):
    """Weighted sum over heads of the (optionally top-k) mean per-sample loss.

    Optional per-row inputs in the target dict: ``__weight`` (a row's loss weight, e.g. a pseudo-labelled
    row's) and ``__teacher`` (distillation: the main head's loss becomes
    ``(1 - alpha) * loss + alpha * distillation(logits, teacher, T)``)."""

    def __init__(self, heads: list[Head], tcfg: dict, main: set[str], class_weights=None, margin: Margin | None = None):
        super().__init__()
        self.margin = margin  # a cosine head's angular margin, on the main head (model.head)
        self.losses = nn.ModuleDict({h.name: HeadLoss(h, tcfg["loss"] if h.name in main else "auto", tcfg,
                                                      class_weights if h.name in main else None) for h in heads})
        self.weights = {h.name: h.weight for h in heads}
        self.rmse = {h.name for h in heads if h.name in main and tcfg["loss"] == "rmse"}
        self.ohem = tcfg["ohem"]
        self.main = next((h.name for h in heads if h.name in main), heads[0].name)
        self.per_label = HEAD_KINDS[next(h.kind for h in heads if h.name == self.main)].activation == "sigmoids"
        if not HEAD_KINDS[next(h.kind for h in heads if h.name == self.main)].margin:
            self.margin = None  # (a jigsaw puzzle head under a margin config: a plain linear head)
        distill = tcfg.get("distill") or {}
        self.alpha, self.temperature = float(distill.get("alpha", 0.0)), float(distill.get("temperature", 1.0))

    def forward(self, out: dict, y: dict, y2: dict | None = None, lam: float = 1.0):
        total = 0.0
        mixed = y2 is not None and lam < 1.0
        w = y.get("__weight")
        if w is not None and mixed:
            w = lam * w + (1 - lam) * y2["__weight"]
        for name, fn in self.losses.items():
            def loss(target, logits=out[name], name=name, fn=fn):
                return fn(self.margin(logits, target) if self.margin is not None and name == self.main else logits,
                          target)

            per = loss(y[name])
            if mixed:
                per = lam * per + (1 - lam) * loss(y2[name])
            if name == self.main and "__teacher" in y:
                teacher = lam * y["__teacher"] + (1 - lam) * y2["__teacher"] if mixed else y["__teacher"]
                per = (1 - self.alpha) * per + self.alpha * distillation(out[name], teacher, self.temperature,
                                                                         self.per_label)
            if w is not None:
                per = per * w
            if self.ohem < 1.0:
                k = max(1, int(math.ceil(self.ohem * len(per))))
                per = per.topk(k).values
            loss = per.mean() if w is None or self.ohem < 1.0 else per.sum() / w.sum().clamp_min(1e-8)
            if name in self.rmse:
                loss = (loss + 1e-8).sqrt()
            total = total + self.weights[name] * loss
        return total


def class_weight_tensor(tcfg: dict, y: np.ndarray | None, n_classes: int) -> torch.Tensor | None:
    cw = tcfg["class_weights"]
    if cw is None or y is None:
        return None
    if cw == "balanced":
        counts = np.bincount(y, minlength=n_classes).astype(float)
        return torch.tensor(len(y) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)
    if len(cw) != n_classes:
        raise InputError(f"train.class_weights has {len(cw)} values for {n_classes} classes.")
    return torch.tensor(cw, dtype=torch.float32)
