"""``make submit``: turn an experiment's (or a stack's) test predictions into a validated submission.

The file has exactly ``sample_submission.csv``'s shape: its ids in its order, its columns, compatible
dtypes, and no NaN/inf. When the competition folder has a ``solution.csv`` with a Kaggle-style
``Usage`` column, the submission is scored locally as the leaderboard would (public and private).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipeline.competition.submission import (  # shared with pipeline.kaggle.inference (a Kaggle notebook)
    class_columns,
    submits_integers,
    text_columns,
    to_submission,
    validate,
)
from pipeline.competition.tables import (
    class_labels,
    encode_labels,
    label_matrix,
    label_text,
    read_table,
    table_path,
)
from pipeline.errors import InputError, SubmissionError  # noqa: F401  (SubmissionError: re-exported)
from pipeline.metrics import get_metric
from pipeline.store import leaderboard
from pipeline.store.artifacts import ArtifactGroup, require_complete, stage_lock
from pipeline.store.io import log, read_json, read_parquet_meta
from pipeline.store.paths import (
    features_dir,
    head_prediction,
    leaderboard_db,
    main_head,
    submission_source,
    submissions_dir,
    targets,
)
from pipeline.tasks import get_task

if TYPE_CHECKING:
    from pipeline.config.schema import Config


def score_local(cfg: Config, sub: pd.DataFrame) -> dict | None:
    """Public/private scores against ``solution.csv`` (Usage column), as the leaderboard would."""
    comp = cfg.competition
    path = table_path(cfg, "solution")
    if not comp.solution or not path.exists():
        return None
    sol = read_table(path, "solution", comp.id)
    if "Usage" not in sol.columns:
        return None
    metric = get_metric(comp.metric)
    if get_task(comp.task).label_sets:  # both tables as 0/1 (or probability) matrices, in label order
        ids = sub[comp.id].astype(str)
        if isinstance(comp.target, str):  # (a label named NA or None is a label)
            sol = sol.assign(**{comp.target: label_text(path, comp.target).to_numpy()})
        aligned = sub.set_index(ids).loc[sol[comp.id].astype(str)].reset_index(drop=True)
        y, pred, usage = label_matrix(cfg, sol, path), label_matrix(cfg, aligned, "submission"), sol["Usage"].to_numpy()
        return {u.lower(): metric(y[usage == u], pred[usage == u]) for u in ("Public", "Private") if (usage == u).any()}
    target = targets(cfg)[0]
    labels = class_labels(cfg)
    if labels is not None:  # string labels: score on their indices, as the stages do
        sol = encode_labels(sol, target, labels, path)
        sub = encode_labels(sub, target, labels, path) if target in sub.columns else sub
    merged = sol.merge(sub, on=comp.id, suffixes=("", "_pred"))
    pred_cols = [c for c in sub.columns if c != comp.id]
    if len(pred_cols) > 1:  # class probabilities: scored in class order, each column matched by its label
        pred_cols = class_columns(pred_cols, len(pred_cols), labels)
    pred = merged[[c + "_pred" if c in sol.columns else c for c in pred_cols]].to_numpy()
    pred = pred[:, 0] if pred.shape[1] == 1 else pred
    scores = {}
    for usage in ("Public", "Private"):
        m = (merged["Usage"] == usage).to_numpy()
        if m.any():
            scores[usage.lower()] = metric(merged[target].to_numpy()[m], pred[m])
    return scores


def run(cfg: Config, force: bool = False) -> Path:
    started = time.time()
    comp = cfg.competition
    source = submission_source(cfg)  # submit.source, else the furthest stage that exists: pp, level 2, level 1
    src = features_dir(cfg, source)
    feats = src / "test.parquet"
    require_complete(src, ["test.parquet"], f"test predictions for '{source}'",
                     "run `make features` (or `make stack`) first, or set submit.source to an experiment that has them")
    test = pd.read_parquet(feats)
    sample_path = table_path(cfg, "sample_submission")
    sample = read_table(sample_path, "sample_submission", comp.id)
    test_ids, sample_ids = set(test[comp.id].astype(str)), set(sample[comp.id].astype(str))
    if test_ids != sample_ids:
        only_sample, only_test = sorted(sample_ids - test_ids), sorted(test_ids - sample_ids)
        raise InputError(f"{sample_path} and {table_path(cfg, 'test')} list different ids ("
                         + (f"{len(only_sample)} only in sample_submission, e.g. {only_sample[:3]}" if only_sample else "")
                         + ("; " if only_sample and only_test else "")
                         + (f"{len(only_test)} only in test, e.g. {only_test[:3]}" if only_test else "")
                         + "); the submission must have one row per test id: fix whichever file is wrong.")
    pred = head_prediction(test, source, main_head(cfg), cfg.submit.stat)
    sub = to_submission(cfg, pred, test[comp.id].astype(str), sample, class_labels(cfg))
    validate(sub, sample, comp.id, where=f"submission for '{source}'", integers=submits_integers(cfg, sample),
             text=text_columns(cfg))
    out = submissions_dir(cfg) / (f"{source}.csv" + (".gz" if cfg.submit.gzip else ""))
    scores = score_local(cfg, sub)
    overall = (read_parquet_meta(feats).get("cv") or {}).get("overall")
    cv_file = src / "cv.json"
    predicted = (read_json(cv_file).get("submission") or {}) if cv_file.exists() else {}
    summary = {"experiment": source, "file": str(out),
               "cv": overall.get("tta") if isinstance(overall, dict) else overall,
               "predicted": predicted.get("predicted"), "predicted_how": predicted.get("how"),
               "local": scores, "rows": int(len(sub))}
    with stage_lock(out), ArtifactGroup(out.with_name(out.name.split(".csv")[0] + ".json")) as group:
        group.add(out, lambda tmp: sub.to_csv(tmp, index=False, compression="gzip" if cfg.submit.gzip else None))
        group.commit(summary)  # the summary JSON is written last: it marks the submission complete
    leaderboard.record(cfg, "submit", started, experiment=source, submission=str(out), artifacts=[str(out)])
    if scores:
        leaderboard.set_score(leaderboard_db(cfg), str(out), scores.get("public"), scores.get("private"),
                              source="local", description="scored against solution.csv")
    msg = f"[submit] wrote {out} ({len(sub)} rows, validated against {sample_path})"
    if summary["cv"] is not None:  # the three numbers: one model's CV, what the submission should score, the LB
        msg += f"; CV {summary['cv']:.4f}" + (f", predicted submission {summary['predicted']:.4f} "
                                              f"({summary['predicted_how'].split(':')[0]})"
                                              if summary["predicted"] is not None else "")
    if scores:
        msg += f"; local leaderboard {comp.metric}: public {scores.get('public', float('nan')):.4f}, " \
               f"private {scores.get('private', float('nan')):.4f}"
    log(msg)
    return out
