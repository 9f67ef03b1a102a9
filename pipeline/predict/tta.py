"""Test-time augmentation: named view sets, batched prediction of every view, per-view statistics.

Used by ``features`` (OOF and test rows) and by ``predict`` (the inference API), so both see the
same views in the same order (the identity view first). Adding a view set: one function returning
ttach transforms, registered in ``TTA_SETS``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.errors import InputError
from pipeline.registry import Registry
from pipeline.store.paths import feature_column
from pipeline.training.models import activate

TTA_SETS = Registry("features.tta")


@TTA_SETS.register("none")
def _none(tta):
    return []


@TTA_SETS.register("hflip")
def _hflip(tta):
    return [tta.HorizontalFlip()]


@TTA_SETS.register("vflip")
def _vflip(tta):
    return [tta.VerticalFlip()]


@TTA_SETS.register("flip")
def _flip(tta):
    return [tta.HorizontalFlip(), tta.VerticalFlip()]


@TTA_SETS.register("d4")
def _d4(tta):
    return [tta.HorizontalFlip(), tta.Rotate90(angles=[0, 90, 180, 270])]


def tta_views(name: str, scales: list[float] | None = None):
    """The view functions (tensor batch -> tensor batch) of a named set; the identity view comes first."""
    import ttach as tta

    if name not in TTA_SETS:
        raise InputError(f"features.tta must be one of {', '.join(TTA_SETS)}, got '{name}'.")
    parts = TTA_SETS[name](tta)
    scales = [float(s) for s in (scales or [1.0])]
    if scales != [1.0]:
        scales = [1.0] + [s for s in scales if s != 1.0]
        parts = parts + [tta.Scale(scales, interpolation="bilinear")]
    if not parts:
        return [lambda x: x]
    return [t.augment_image for t in tta.Compose(parts)]


@torch.no_grad()
def predict_views(model, heads, loader, views, device, embed: bool = False) -> dict[str, np.ndarray]:
    """Per-view activated outputs: {head: array (V, N, D)}; plus 'embedding' (N, E) of the identity view.

    The V views of a batch are stacked into one batch of V*B images (one forward pass per batch;
    views that change the size, as multi-scale does, get one pass per size)."""
    model.eval()
    outs = {h.name: [] for h in heads}
    embs = []
    for x, _, _ in loader:
        x = x.to(device)
        b = x.shape[0]
        viewed = [v(x) for v in views]
        per_view: list[dict] = [None] * len(views)
        by_size: dict[tuple, list[int]] = {}
        for i, v in enumerate(viewed):
            by_size.setdefault(tuple(v.shape[-2:]), []).append(i)
        for idx in by_size.values():
            out = model(torch.cat([viewed[i] for i in idx]))
            for j, i in enumerate(idx):
                per_view[i] = {h.name: activate(h, out[h.name][j * b:(j + 1) * b]) for h in heads}
        for h in heads:
            outs[h.name].append(torch.stack([pv[h.name].reshape(b, -1) for pv in per_view]).cpu().numpy())
        if embed:
            embs.append(model.embed(x).float().cpu().numpy())
    res = {k: np.concatenate(v, axis=1) for k, v in outs.items()}
    if embed:
        res["embedding"] = np.concatenate(embs)
    return res


STATS = {"mean": lambda a: a.mean(0), "var": lambda a: a.var(0), "max": lambda a: a.max(0), "min": lambda a: a.min(0)}


def aggregate(feature_set: str, outputs: dict[str, np.ndarray], stats: list[str], keep_views: bool) -> pd.DataFrame:
    """(V, N, D) per head -> columns ``<set>__<head>__<j>__<stat>`` (and ``__v<i>`` per view)."""
    cols = {}
    for head, arr in outputs.items():
        if head == "embedding":
            for j in range(arr.shape[1]):
                cols[feature_column(feature_set, "embedding", j, "value")] = arr[:, j]
            continue
        for j in range(arr.shape[2]):
            for s in stats:
                if s not in STATS:
                    raise InputError(f"features.stats: unknown statistic '{s}' ({', '.join(STATS)}).")
                cols[feature_column(feature_set, head, j, s)] = STATS[s](arr[:, :, j])
            if keep_views:
                for v in range(arr.shape[0]):
                    cols[feature_column(feature_set, head, j, f"v{v}")] = arr[v, :, j]
    return pd.DataFrame(cols)
