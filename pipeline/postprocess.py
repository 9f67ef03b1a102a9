"""``make postprocess``: rules tuned on out-of-fold predictions only, then applied to test.

Rules (each a config switch, applied in this order):

- ``blend_with``: blend the source with a level-1 experiment, ``w·source + (1-w)·other`` (w tuned, or fixed)
- ``force_from``: force class i when a one-hot (multiclass) head's probability exceeds t (t tuned)
- ``class_scale``: per-class probability multipliers (multiclass)
- ``threshold``: the decision threshold of a binary target (for F1, accuracy, ...)
- ``rounding``: optimised rounding thresholds of an ordinal/regression target (QWK)
- ``clip``: clip regression values to the train target's range (or a given [lo, hi])

The gain is reported twice: in-sample (tuned and scored on all OOF rows) and nested (for each fold,
tuned on the other folds and scored on it), so an overfit threshold is visible.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import leaderboard
from .competition import fold_of, load_folds, load_train
from .errors import InputError
from .io import (
    config_hash,
    is_up_to_date,
    log,
    provenance,
    read_parquet_meta,
    write_json,
    write_parquet,
    write_resolved_config,
)
from .metrics import get_metric
from .paths import features_dir, head_prediction, prediction_frame, stack_name, targets

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
    if task == "multiclass":
        p[hit] = np.eye(p.shape[1])[cls[hit]]
    else:
        p[hit] = cls[hit]
    return p


def apply_scale(p, m):
    q = p * np.asarray(m)[None, :]
    return q / q.sum(axis=1, keepdims=True)


def apply_threshold(p, t):
    """Monotone map sending threshold t to 0.5, so 'p >= 0.5' downstream means 'p >= t'."""
    p = np.asarray(p, float)
    return np.where(p >= t, 0.5 + 0.5 * (p - t) / max(1 - t, 1e-12), 0.5 * p / max(t, 1e-12))


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
    if pcfg["class_scale"] and task == "multiclass":
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
    if pcfg["threshold"] and task == "binary":
        grid = np.round(np.linspace(0.02, 0.98, 49), 3)
        params["threshold"] = float(max(grid, key=lambda t: (sign * score(apply_threshold(p, t)), -abs(t - 0.5))))
        p = apply_threshold(p, params["threshold"])
    if pcfg["rounding"] and task in ("regression", "ordinal"):
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
    if pcfg["clip"] and task in ("regression", "ordinal"):
        lo, hi = pcfg["clip"] if isinstance(pcfg["clip"], (list, tuple)) else target_range
        params["clip"] = [float(lo), float(hi)]
    return params


def apply_rules(params: dict, task: str, p, other=None, onehot=None):
    if "blend" in params and other is not None:
        p = apply_blend(p, params["blend"], other)
    if "force" in params and onehot is not None:
        p = apply_force(p, params["force"], onehot, task)
    if "class_scale" in params:
        p = apply_scale(p, params["class_scale"])
    if "threshold" in params:
        p = apply_threshold(p, params["threshold"])
    if "rounding" in params:
        p = apply_rounding(p, params["rounding"]["cuts"]) + params["rounding"]["offset"]
    if "clip" in params:
        p = apply_clip(p, *params["clip"])
    return p


def honest_gain(pcfg, task, metric, y, p, fold, other=None, onehot=None, target_range=None) -> dict:
    """In-sample gain vs nested-CV gain of the tuned rules."""
    base = metric(y, p)
    params = fit_rules(pcfg, task, metric, y, p, other, onehot, target_range)
    in_sample = metric(y, apply_rules(params, task, p, other, onehot))
    nested = np.array(p, dtype=float, copy=True)
    per_fold = {}
    for k in sorted(np.unique(fold)):
        tr, va = fold != k, fold == k
        sub = lambda a, m: None if a is None else a[m]
        pk = fit_rules(pcfg, task, metric, y[tr], p[tr], sub(other, tr), sub(onehot, tr), target_range)
        nested[va] = apply_rules(pk, task, p[va], sub(other, va), sub(onehot, va))
        per_fold[f"fold{k}"] = pk
    nested_score = metric(y, nested)
    return {"params": params, "base": base, "in_sample": in_sample, "nested": nested_score,
            "in_sample_gain": in_sample - base, "nested_gain": nested_score - base, "per_fold_params": per_fold}


# ------------------------------------------------------------------------------------------- stage
def run(cfg: dict, force: bool = False) -> Path:
    pcfg, comp = cfg["postprocess"], cfg["competition"]
    task = comp["task"]
    metric = get_metric(comp["metric"])
    id_col, head = comp["id"], targets(cfg)[0]
    source = pcfg["source"] or (stack_name(cfg) if (features_dir(cfg, stack_name(cfg)) / "oof.parquet").exists()
                                else cfg["name"])
    name = pcfg["name"] or f"{source}-pp"
    src_dir, out = features_dir(cfg, source), features_dir(cfg, name)
    if not (src_dir / "oof.parquet").exists():
        raise InputError(f"{src_dir}: no OOF predictions to post-process; run `make features` or `make stack` first.")
    train_df = load_train(cfg, check_images=False)
    folds_df, folds_hash = load_folds(cfg)
    inputs = [source] + [e for e in (pcfg["blend_with"], (pcfg["force_from"] or {}).get("experiment")) if e]
    metas = {e: read_parquet_meta(features_dir(cfg, e) / "oof.parquet") for e in inputs}
    for e, m in metas.items():
        if m.get("folds_hash") != folds_hash:
            raise InputError(f"features/{e} was made with another folds file; post-processing must be tuned on "
                             "OOF of the current folds. Rebuild it.")
    key = config_hash([pcfg, comp, folds_hash, [m.get("stage_key") for m in metas.values()]])
    if not force and is_up_to_date(out / "meta.json", key, [out / "oof.parquet", out / "test.parquet"]):
        log(f"[postprocess] up to date: {out}")
        return out
    started = time.time()

    def load(exp, which, head_name=head, stat="mean"):
        df = pd.read_parquet(features_dir(cfg, exp) / f"{which}.parquet")
        order = train_df[[id_col]] if which == "oof" else None
        if order is not None:
            df = order.merge(df, on=id_col, how="left")
        return df[id_col].to_numpy(), head_prediction(df, exp, head_name, stat)

    _, p = load(source, "oof")
    test_ids, pt = load(source, "test")
    other = other_t = onehot = onehot_t = None
    if pcfg["blend_with"]:
        other, other_t = load(pcfg["blend_with"], "oof")[1], load(pcfg["blend_with"], "test")[1]
    if pcfg["force_from"]:
        ff = pcfg["force_from"]
        onehot = load(ff["experiment"], "oof", ff.get("head", head))[1]
        onehot_t = load(ff["experiment"], "test", ff.get("head", head))[1]
        if onehot.ndim != 2:
            raise InputError(f"postprocess.force_from: head '{ff.get('head', head)}' of {ff['experiment']} is not a "
                             "multiclass (one-hot) head.")
    y = train_df[head].to_numpy()
    fold = fold_of(cfg, train_df, folds_df)
    target_range = (float(y.min()), float(y.max())) if task in ("regression", "ordinal") else None
    res = honest_gain(pcfg, task, metric, y, p, fold, other, onehot, target_range)
    oof_pp = apply_rules(res["params"], task, p, other, onehot)
    test_pp = apply_rules(res["params"], task, pt, other_t, onehot_t)

    cv = {"overall": {"tta": res["in_sample"], "no_tta": res["in_sample"]}}
    meta = provenance(cfg, "postprocess", key, folds_hash=folds_hash, source=source, gain=res, cv=cv)
    write_parquet(out / "oof.parquet", prediction_frame(train_df[id_col].to_numpy(), id_col, name, head, oof_pp, fold), meta)
    write_parquet(out / "test.parquet", prediction_frame(test_ids, id_col, name, head, test_pp), meta)
    write_json(out / "cv.json", cv)
    write_json(out / "postprocess.json", res)
    write_resolved_config(out / "config.yaml", cfg)
    write_json(out / "meta.json", meta)
    leaderboard.record(cfg, "stack", started, cv=res["nested"], experiment=name, note="postprocess (nested CV score)",
                       artifacts=[str(out / "oof.parquet"), str(out / "test.parquet")])
    log(f"[postprocess] {name}: {metric.name} {res['base']:.4f} -> in-sample {res['in_sample']:.4f} "
        f"({res['in_sample_gain']:+.4f}), nested CV {res['nested']:.4f} ({res['nested_gain']:+.4f}); "
        f"params {res['params']}")
    return out
