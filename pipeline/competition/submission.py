"""A submission frame in ``sample_submission.csv``'s exact shape, and the checks the leaderboard would
make: shared by the ``submit`` stage and ``pipeline.kaggle.inference`` (a Kaggle notebook), so both write and
validate a submission the same way.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.competition import label_sets
from pipeline.errors import SubmissionError
from pipeline.metrics import to_labels
from pipeline.tasks import get_task

if TYPE_CHECKING:
    from pipeline.config.schema import Config


def class_columns(cols: list, n_classes: int, labels: list | None = None) -> list:
    """The sample_submission column of each class index 0..n-1, matched by the class's label (column '9'
    holds class 9's probability whatever the column order). Columns that name no class at all (e.g.
    'Class_1'..) are taken in order, and the log says so; columns naming only some classes are refused."""
    names = [str(v) for v in (labels if labels is not None else range(n_classes))]
    by_name = {str(c): c for c in cols}
    hits = [nm for nm in names if nm in by_name]
    if len(hits) == len(names) == len(cols):
        return [by_name[nm] for nm in names]
    if not hits:
        from pipeline.store.io import log

        log(f"[submit] sample_submission's columns {list(cols)[:4]}... name no class label {names[:4]}...: class "
            f"i goes to the i-th column ({cols[0]!r} <- class {names[0]!r}); rename them to the labels to match by name")
        return list(cols)
    raise SubmissionError(f"sample_submission's probability columns {list(cols)} name some classes but not all of "
                          f"{names}; missing {[nm for nm in names if nm not in by_name][:5]}: fix the columns or "
                          "competition.target")


def submits_integers(cfg: Config, sample: pd.DataFrame) -> bool:
    """Whether the submission's values are integers (class labels, rounded ordinal values), so an integer
    sample column must be matched; probabilities and regression values are floats whatever the sample's
    placeholder (a sample of 0s for an AUC competition is common)."""
    task = get_task(cfg.competition.task)
    if len(sample.columns) > 2 and not task.label_sets:  # one probability column per class
        return False
    return task.submits_labels(cfg.competition.metric) or task.submission == "rounded"


def text_columns(cfg: Config) -> list[str]:
    """Submission columns that hold text whatever the sample's placeholder: a label set's space-separated
    column (a sample of 0s reads as numbers)."""
    comp = cfg.competition
    return [comp.target] if get_task(comp.task).label_sets and isinstance(comp.target, str) else []


def validate(sub: pd.DataFrame, sample: pd.DataFrame, id_col: str, where: str = "submission",
             integers: bool = True, text: list | tuple = ()) -> None:
    """The submission has sample_submission's ids, order and columns, finite values, and (``integers``)
    integers where the sample's column holds integers; ``text``: columns of labels (``text_columns``)."""
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
        if c in text:  # space-separated labels; an empty cell is the empty set
            continue
        if not pd.api.types.is_numeric_dtype(sample[c]) and not pd.api.types.is_numeric_dtype(v):
            if v.isna().any():  # string class labels: every row needs one
                raise SubmissionError(f"{where}: column '{c}' is empty at {int(v.isna().sum())} row(s), e.g. id "
                                      f"'{sub[id_col][v.isna()].iloc[0]}'.")
            continue
        if not pd.api.types.is_numeric_dtype(v):
            raise SubmissionError(f"{where}: column '{c}' is not numeric (dtype {v.dtype}).")
        bad = ~np.isfinite(v.to_numpy(dtype=float))
        if bad.any():
            raise SubmissionError(f"{where}: column '{c}' has NaN/inf at {bad.sum()} row(s), e.g. id "
                                  f"'{sub[id_col][bad].iloc[0]}'.")
        if integers and pd.api.types.is_integer_dtype(sample[c]) and not np.allclose(v, np.round(v)):
            raise SubmissionError(f"{where}: column '{c}' must hold integers like sample_submission's, got {v.iloc[0]!r}.")


def to_submission(cfg: Config, pred: np.ndarray, ids, sample: pd.DataFrame, labels: list | None = None) -> pd.DataFrame:
    """Predictions (N,) or (N, C) in test order -> a frame in sample_submission's shape; with string
    class ``labels`` (see ``competition.class_labels``) a predicted class index is written as its label."""
    comp = cfg.competition
    id_col = comp.id
    cols = [c for c in sample.columns if c != id_col]
    pred_by_id = pd.DataFrame(np.asarray(pred).reshape(len(pred), -1), index=pd.Index(ids, dtype=str))
    pred_by_id = pred_by_id.reindex(sample[id_col].astype(str))
    out = sample[[id_col]].copy()
    p = pred_by_id.to_numpy()
    task = get_task(comp.task)
    if task.label_sets and task.submits_labels(comp.metric):  # yes/no per label (thresholds: postprocess)
        p = np.where(np.isnan(p), p, (p >= 0.5).astype(float))
    if task.label_sets and len(cols) > 1 and p.shape[1] != len(cols):
        raise SubmissionError(f"sample_submission has {len(cols)} prediction columns for {p.shape[1]} labels "
                              f"({', '.join(map(str, (labels or [])[:6]))}); a label set is submitted as one column "
                              "per label or as one column of space-separated labels: fix the sample or competition.target")
    if len(cols) > 1 and p.shape[1] == len(cols):  # one probability column per class, matched by label
        for j, c in enumerate(class_columns(cols, p.shape[1], labels)):
            out[c] = p[:, j].astype(int) if task.submits_labels(comp.metric) and task.label_sets and \
                not np.isnan(p[:, j]).any() else p[:, j]
        return out[sample.columns]
    nan = np.isnan(p).any(axis=1)
    if nan.any():  # a prediction that is not a number: name the rows instead of writing a broken file
        bad = sample[id_col].astype(str)[nan]
        raise SubmissionError(f"predictions for {int(nan.sum())} test row(s) are NaN/inf, e.g. id '{bad.iloc[0]}' "
                              "(a diverged model or a broken feature set?); check the source's test predictions.")
    p = p[:, 0] if p.shape[1] == 1 else p
    col = cols[0]
    if task.label_sets:  # one column of space-separated labels
        out[col] = label_sets.write(p, labels)
    elif task.submits_labels(comp.metric):
        out[col] = to_labels(p) if not np.isnan(p).any() else p
        if labels is not None and not np.isnan(p).any():
            out[col] = np.asarray(labels, dtype=object)[out[col].to_numpy()]
    elif task.submission == "rounded" and pd.api.types.is_integer_dtype(sample[col]):
        out[col] = np.rint(p) if np.isnan(p).any() else np.rint(p).astype(int)
    else:
        out[col] = p
    return out
