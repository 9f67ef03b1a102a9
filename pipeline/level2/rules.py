"""Post-processing rules: tuned on out-of-fold predictions (``fit_rules``), applied to any predictions
(``apply_rules``), and their honest gain (in-sample vs nested CV).

Used by the ``postprocess`` stage (tuning) and by ``pipeline.kaggle.inference`` (a Kaggle notebook applies the
tuned parameters to its test predictions), so both apply the very same code.
"""
from __future__ import annotations

import numpy as np

from pipeline.tasks import get_task, head_kind

GRID = np.round(np.linspace(0, 1, 21), 3)


# ------------------------------------------------------------------------------------------- rules
def apply_blend(p, w, other):
    return w * p + (1 - w) * other


def apply_force(p, t, onehot, task):
    """Where the one-hot head's top probability exceeds t, predict that class."""
    if t is None:
        return p
    top, cls = onehot.max(axis=1), onehot.argmax(axis=1)
    hit = top > t
    p = p.copy()
    if head_kind(get_task(task).head).outputs == "classes":  # a probability row per class
        p[hit] = np.eye(p.shape[1])[cls[hit]]
    else:
        p[hit] = cls[hit]
    return p


def apply_scale(p, m):
    q = p * np.asarray(m)[None, :]
    return q / q.sum(axis=1, keepdims=True)


def apply_threshold(p, t):
    """Monotone map sending threshold t to 0.5, so 'p >= 0.5' downstream means 'p >= t'. ``t``: one threshold,
    or one per column (a label set's per-label thresholds)."""
    p, t = np.asarray(p, float), np.asarray(t, float)
    return np.where(p >= t, 0.5 + 0.5 * (p - t) / np.maximum(1 - t, 1e-12), 0.5 * p / np.maximum(t, 1e-12))


def apply_rounding(p, cuts):
    return np.searchsorted(np.sort(np.asarray(cuts)), np.asarray(p, float), side="right").astype(float)


def apply_clip(p, lo, hi):
    return np.clip(p, lo, hi)


def fit_rules(pcfg: dict, task: str, metric, y, p, other=None, onehot=None, target_range=None) -> dict:
    """Tune every enabled rule on (y, p); returns the parameters ``apply_rules`` needs."""
    params = {}
    score = lambda q: metric(y, q)
    sign = 1 if metric.higher_is_better else -1

    if other is not None:
        if pcfg["blend_weight"] is not None:
            params["blend"] = float(pcfg["blend_weight"])
        else:
            params["blend"] = float(max(GRID, key=lambda w: sign * score(apply_blend(p, w, other))))
        p = apply_blend(p, params["blend"], other)
    if onehot is not None:
        if pcfg["force_threshold"] is not None:
            params["force"] = float(pcfg["force_threshold"])
        else:
            cands = [None] + list(np.round(np.linspace(0.5, 0.99, 50), 3))
            base = sign * score(p)
            best = max(cands, key=lambda t: (sign * score(apply_force(p, t, onehot, task)), t is None))
            params["force"] = None if best is None or sign * score(apply_force(p, best, onehot, task)) <= base else float(best)
        p = apply_force(p, params["force"], onehot, task)
    if pcfg["class_scale"] and "class_scale" in get_task(task).rules:
        m = np.ones(p.shape[1])
        grid = np.round(np.linspace(0.5, 2.0, 16), 3)
        for _ in range(2):  # coordinate ascent, two sweeps
            for c in range(p.shape[1]):
                def s(v, c=c):
                    mm = m.copy()
                    mm[c] = v
                    return sign * score(apply_scale(p, mm))
                m[c] = max(grid, key=lambda v: (s(v), -abs(v - 1)))
        params["class_scale"] = m.tolist()
        p = apply_scale(p, m)
    if pcfg["threshold"] and "threshold" in get_task(task).rules:
        grid = np.round(np.linspace(0.02, 0.98, 49), 3)
        params["threshold"] = float(max(grid, key=lambda t: (sign * score(apply_threshold(p, t)), -abs(t - 0.5))))
        p = apply_threshold(p, params["threshold"])
    if pcfg["threshold"] and "label_thresholds" in get_task(task).rules:
        params["label_thresholds"] = label_thresholds(metric, y, p).tolist()
        p = apply_threshold(p, params["label_thresholds"])
    if pcfg["rounding"] and "rounding" in get_task(task).rules:
        lo, hi = (target_range if target_range is not None else (np.floor(p.min()), np.ceil(p.max())))
        cuts = np.arange(lo, hi) + 0.5
        for _ in range(2):
            for i in range(len(cuts)):
                grid = np.linspace(cuts[i] - 0.5, cuts[i] + 0.5, 21)
                def s(v, i=i):
                    cc = cuts.copy()
                    cc[i] = v
                    return sign * score(apply_rounding(p, cc) + lo)
                cuts[i] = max(grid, key=s)
        params["rounding"] = {"cuts": np.sort(cuts).tolist(), "offset": float(lo)}
        p = apply_rounding(p, params["rounding"]["cuts"]) + lo
    if pcfg["clip"] and "clip" in get_task(task).rules:
        lo, hi = pcfg["clip"] if isinstance(pcfg["clip"], (list, tuple)) else target_range
        params["clip"] = [float(lo), float(hi)]
    return params


LABEL_GRID = np.round(np.linspace(0.02, 0.98, 49), 3)
RANK_METRICS = ("map", "mean_auc")  # a label's ranking: no threshold changes them


def label_thresholds(metric, y, p) -> np.ndarray:
    """A label set's threshold per label, by coordinate ascent on the whole metric (two sweeps over the labels;
    micro-F1 couples them), the threshold nearer 0.5 on a tie. F1 is computed from each label's counts at every
    grid threshold (a sort per label, then sums), so thousands of labels take seconds; ranking metrics keep
    0.5; any other metric is rescored in full per candidate."""
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    if metric.name in RANK_METRICS:
        return np.full(p.shape[1], 0.5)
    if metric.name in ("micro_f1", "macro_f1"):
        return _f1_thresholds(y, p, micro=metric.name == "micro_f1")
    sign = 1 if metric.higher_is_better else -1
    t = np.full(p.shape[1], 0.5)
    for _ in range(2):
        for j in range(p.shape[1]):
            def s(v, j=j):
                tt = t.copy()
                tt[j] = v
                return sign * metric(y, apply_threshold(p, tt))
            t[j] = max(LABEL_GRID, key=lambda v: (s(v), -abs(v - 0.5)))
    return t


def _f1_thresholds(y, p, micro: bool) -> np.ndarray:
    positives = y.astype(bool)
    tp, fp, fn = (np.zeros((p.shape[1], len(LABEL_GRID))) for _ in range(3))
    for j in range(p.shape[1]):  # rows at or above each threshold: all of them, and the label's positives
        on = len(p) - np.searchsorted(np.sort(p[:, j]), LABEL_GRID, side="left")
        hit = positives[:, j].sum() - np.searchsorted(np.sort(p[positives[:, j], j]), LABEL_GRID, side="left")
        tp[j], fp[j], fn[j] = hit, on - hit, positives[:, j].sum() - hit
    tie = -np.abs(LABEL_GRID - 0.5)  # (max over (score, tie) takes the first of equal keys, as max() does)

    def best(scores: np.ndarray) -> int:
        keys = np.lexsort((-np.arange(len(scores)), tie, scores))
        return int(keys[-1])

    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    if not micro:  # the mean of per-label F1s: each label on its own
        return LABEL_GRID[[best(f1[j]) for j in range(len(f1))]]
    pick = np.full(p.shape[1], int(np.argmin(np.abs(LABEL_GRID - 0.5))))
    for _ in range(2):
        for j in range(p.shape[1]):
            rows = np.arange(p.shape[1]) != j
            TP = tp[rows, pick[rows]].sum() + tp[j]
            FP = fp[rows, pick[rows]].sum() + fp[j]
            FN = fn[rows, pick[rows]].sum() + fn[j]
            pick[j] = best(2 * TP / np.maximum(2 * TP + FP + FN, 1))
    return LABEL_GRID[pick]


def apply_rules(params: dict, task: str, p, other=None, onehot=None):
    if "blend" in params and other is not None:
        p = apply_blend(p, params["blend"], other)
    if "force" in params and onehot is not None:
        p = apply_force(p, params["force"], onehot, task)
    if "class_scale" in params:
        p = apply_scale(p, params["class_scale"])
    if "threshold" in params:
        p = apply_threshold(p, params["threshold"])
    if "label_thresholds" in params:
        p = apply_threshold(p, params["label_thresholds"])
    if "rounding" in params:
        p = apply_rounding(p, params["rounding"]["cuts"]) + params["rounding"]["offset"]
    if "clip" in params:
        p = apply_clip(p, *params["clip"])
    return p


def honest_gain(pcfg, task, metric, y, p, fold, other=None, onehot=None) -> tuple[dict, np.ndarray]:
    """The rules tuned on every OOF row (for the test predictions), their in-sample gain, and their honest
    gain: fold k's rows post-processed by rules tuned on the other folds' rows alone (nested CV). Returns
    (report, nested predictions): the nested ones are the post-processed OOF, so no row's value was tuned
    with its own label (the bounds of rounding and clipping included: fold k's come from the other folds)."""
    def label_range(labels):
        return (float(labels.min()), float(labels.max())) if not get_task(task).head_kind.classes else None

    base = metric(y, p)
    params = fit_rules(pcfg, task, metric, y, p, other, onehot, label_range(y))
    in_sample = metric(y, apply_rules(params, task, p, other, onehot))
    nested = np.array(p, dtype=float, copy=True)
    per_fold, per_fold_score = {}, {}
    for k in sorted(np.unique(fold)):
        tr, va = fold != k, fold == k
        sub = lambda a, m: None if a is None else a[m]
        pk = fit_rules(pcfg, task, metric, y[tr], p[tr], sub(other, tr), sub(onehot, tr), label_range(y[tr]))
        nested[va] = apply_rules(pk, task, p[va], sub(other, va), sub(onehot, va))
        per_fold[f"fold{k}"] = pk
        per_fold_score[f"fold{k}"] = metric(y[va], nested[va])
    nested_score = metric(y, nested)
    return {"params": params, "base": base, "in_sample": in_sample, "nested": nested_score,
            "in_sample_gain": in_sample - base, "nested_gain": nested_score - base, "per_fold_params": per_fold,
            "per_fold_nested": per_fold_score}, nested
