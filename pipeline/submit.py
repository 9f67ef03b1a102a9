"""``make submit``: turn an experiment's (or a stack's) test predictions into a validated submission.

The file has exactly ``sample_submission.csv``'s shape: its ids in its order, its columns, compatible
dtypes, and no NaN/inf. When the competition folder has a ``solution.csv`` with a Kaggle-style
``Usage`` column, the submission is scored locally as the leaderboard would (public and private).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import leaderboard
from .competition import read_table, table_path
from .errors import InputError, SubmissionError
from .io import atomic_path, log, read_parquet_meta, write_json
from .metrics import get_metric, to_labels
from .paths import (
    features_dir,
    head_prediction,
    leaderboard_db,
    stack_name,
    submissions_dir,
    targets,
)


def validate(sub: pd.DataFrame, sample: pd.DataFrame, id_col: str, where: str = "submission") -> None:
    if list(sub.columns) != list(sample.columns):
        raise SubmissionError(f"{where}: columns {list(sub.columns)} differ from sample_submission's {list(sample.columns)}.")
    ids, want = sub[id_col].astype(str), sample[id_col].astype(str)
    extra, missing = set(ids) - set(want), set(want) - set(ids)
    if missing:
        raise SubmissionError(f"{where}: {len(missing)} id(s) of sample_submission are missing, e.g. {sorted(missing)[:3]}.")
    if extra:
        raise SubmissionError(f"{where}: {len(extra)} id(s) not in sample_submission, e.g. {sorted(extra)[:3]}.")
    if ids.duplicated().any():
        raise SubmissionError(f"{where}: id '{ids[ids.duplicated()].iloc[0]}' appears more than once.")
    if list(ids) != list(want):
        raise SubmissionError(f"{where}: ids are not in sample_submission's order.")
    for c in sample.columns:
        if c == id_col:
            continue
        v = sub[c]
        if not pd.api.types.is_numeric_dtype(v):
            raise SubmissionError(f"{where}: column '{c}' is not numeric (dtype {v.dtype}).")
        bad = ~np.isfinite(v.to_numpy(dtype=float))
        if bad.any():
            raise SubmissionError(f"{where}: column '{c}' has NaN/inf at {bad.sum()} row(s), e.g. id "
                                  f"'{sub[id_col][bad].iloc[0]}'.")
        if pd.api.types.is_integer_dtype(sample[c]) and not np.allclose(v, np.round(v)):
            raise SubmissionError(f"{where}: column '{c}' must hold integers like sample_submission's, got {v.iloc[0]!r}.")


def to_submission(cfg: dict, pred: np.ndarray, ids, sample: pd.DataFrame) -> pd.DataFrame:
    """Predictions (N,) or (N, C) in test order -> a frame in sample_submission's shape."""
    comp = cfg["competition"]
    id_col = comp["id"]
    cols = [c for c in sample.columns if c != id_col]
    pred_by_id = pd.DataFrame(np.asarray(pred).reshape(len(pred), -1), index=pd.Index(ids, dtype=str))
    pred_by_id = pred_by_id.reindex(sample[id_col].astype(str))
    out = sample[[id_col]].copy()
    p = pred_by_id.to_numpy()
    if len(cols) > 1 and p.shape[1] == len(cols):  # one probability column per class
        for j, c in enumerate(cols):
            out[c] = p[:, j]
        return out
    p = p[:, 0] if p.shape[1] == 1 else p
    task, metric = comp["task"], comp["metric"]
    col = cols[0]
    if task == "multiclass" or (task == "binary" and metric not in ("auc", "logloss")):
        out[col] = to_labels(p) if not np.isnan(p).any() else p
    elif task == "ordinal" and pd.api.types.is_integer_dtype(sample[col]):
        out[col] = np.rint(p) if np.isnan(p).any() else np.rint(p).astype(int)
    else:
        out[col] = p
    return out


def score_local(cfg: dict, sub: pd.DataFrame) -> dict | None:
    """Public/private scores against ``solution.csv`` (Usage column), as the leaderboard would."""
    comp = cfg["competition"]
    path = table_path(cfg, "solution")
    if not comp["solution"] or not path.exists():
        return None
    sol = read_table(path, "solution", comp["id"])
    if "Usage" not in sol.columns:
        return None
    metric = get_metric(comp["metric"])
    target = targets(cfg)[0]
    merged = sol.merge(sub, on=comp["id"], suffixes=("", "_pred"))
    pred_cols = [c for c in sub.columns if c != comp["id"]]
    pred = merged[[c + "_pred" if c in sol.columns else c for c in pred_cols]].to_numpy()
    pred = pred[:, 0] if pred.shape[1] == 1 else pred
    scores = {}
    for usage in ("Public", "Private"):
        m = (merged["Usage"] == usage).to_numpy()
        if m.any():
            scores[usage.lower()] = metric(merged[target].to_numpy()[m], pred[m])
    return scores


def run(cfg: dict, force: bool = False) -> Path:
    started = time.time()
    comp = cfg["competition"]
    source = cfg["submit"]["source"]
    if not source:  # the furthest stage of this config's chain that exists: post-processed, level 2, level 1
        pp = cfg["postprocess"]["name"]
        chain = ([pp] if pp else [f"{stack_name(cfg)}-pp", f"{cfg['name']}-pp"]) + [stack_name(cfg), cfg["name"]]
        source = next((c for c in chain if (features_dir(cfg, c) / "test.parquet").exists()), cfg["name"])
    feats = features_dir(cfg, source) / "test.parquet"
    if not feats.exists():
        raise InputError(f"{feats}: no test predictions for '{source}'; run `make features` (or `make stack`) first, "
                         "or set submit.source to an experiment that has them.")
    test = pd.read_parquet(feats)
    sample_path = table_path(cfg, "sample_submission")
    sample = read_table(sample_path, "sample_submission", comp["id"])
    pred = head_prediction(test, source, targets(cfg)[0], cfg["submit"]["stat"])
    sub = to_submission(cfg, pred, test[comp["id"]].astype(str), sample)
    validate(sub, sample, comp["id"], where=f"submission for '{source}'")
    out = submissions_dir(cfg) / (f"{source}.csv" + (".gz" if cfg["submit"]["gzip"] else ""))
    with atomic_path(out) as tmp:
        sub.to_csv(tmp, index=False, compression="gzip" if cfg["submit"]["gzip"] else None)
    scores = score_local(cfg, sub)
    overall = (read_parquet_meta(feats).get("cv") or {}).get("overall")
    summary = {"experiment": source, "file": str(out),
               "cv": overall.get("tta") if isinstance(overall, dict) else overall,
               "local": scores, "rows": int(len(sub))}
    write_json(out.with_name(out.name.split(".csv")[0] + ".json"), summary)
    leaderboard.record(cfg, "submit", started, experiment=source, submission=str(out), artifacts=[str(out)])
    if scores:
        leaderboard.set_score(leaderboard_db(cfg), str(out), scores.get("public"), scores.get("private"),
                              source="local", description="scored against solution.csv")
    msg = f"[submit] wrote {out} ({len(sub)} rows, validated against {sample_path})"
    if scores:
        msg += f"; local leaderboard {comp['metric']}: public {scores.get('public', float('nan')):.4f}, " \
               f"private {scores.get('private', float('nan')):.4f}"
    log(msg)
    return out
