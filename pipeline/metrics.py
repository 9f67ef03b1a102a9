"""Competition metrics. Each takes the true targets and a prediction as the stages produce it:

- binary: probability of class 1, shape (n,)
- multiclass: class probabilities, shape (n, C)
- regression / ordinal: values, shape (n,)
- multilabel: truth (n, L) 0/1 and a probability per label, shape (n, L)

Label metrics (accuracy, macro-F1, QWK) turn probabilities into labels (argmax, or 0.5 for binary)
and round regression values; ``higher_is_better`` tells the direction for sorting and early stopping.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def to_labels(pred: np.ndarray) -> np.ndarray:
    pred = np.asarray(pred)
    if pred.ndim == 2:
        return pred.argmax(axis=1)
    if np.issubdtype(pred.dtype, np.floating) and pred.size and pred.min() >= 0 and pred.max() <= 1:
        return (pred >= 0.5).astype(int)
    return np.rint(pred).astype(int)


def accuracy(y, p):
    return float(np.mean(np.asarray(y).astype(int) == to_labels(p)))


def label_sets(y) -> bool:
    """Truth given as a 0/1 matrix (rows, labels): a multilabel target."""
    return np.ndim(y) == 2


def logloss(y, p, eps=1e-15):
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    if p.ndim == 1 or label_sets(y):  # (per label: the mean binary log loss over every row and label)
        p = np.clip(p, eps, 1 - eps)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    p = np.clip(p, eps, 1)
    p = p / p.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def auc(y, p):
    from sklearn.metrics import roc_auc_score

    p = np.asarray(p)
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    if p.ndim == 2:
        return float(roc_auc_score(y, p, multi_class="ovr"))
    return float(roc_auc_score(y, p))


def rmse(y, p):
    return float(np.sqrt(np.mean((np.asarray(y, float) - _values(p)) ** 2)))


def mae(y, p):
    return float(np.mean(np.abs(np.asarray(y, float) - _values(p))))


def qwk(y, p):
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score(np.asarray(y).astype(int), to_labels(p), weights="quadratic"))


def macro_f1(y, p):
    """Classes: sklearn's macro F1 of the argmax. Label sets: the mean over labels of each label's F1 at 0.5
    (a label neither true nor predicted in these rows scores 0, as sklearn's does)."""
    if label_sets(y):
        tp, fp, fn = _counts(y, p)
        return float(np.mean(2 * tp / np.maximum(2 * tp + fp + fn, 1)))
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(y).astype(int), to_labels(p), average="macro"))


def _counts(y, p):
    """Per label: true positives, false positives, false negatives of ``p >= 0.5``."""
    y, on = np.asarray(y).astype(bool), np.asarray(p, dtype=float) >= 0.5
    return (y & on).sum(0), (~y & on).sum(0), (y & ~on).sum(0)


def micro_f1(y, p):
    """F1 over every (row, label) decision at 0.5."""
    tp, fp, fn = (c.sum() for c in _counts(y, p))
    return float(2 * tp / max(2 * tp + fp + fn, 1))


def _per_label(score, y, p) -> float:
    """The mean of ``score`` over the labels that have both values in these rows (others have no score)."""
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    keep = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    return float(np.mean([score(y[:, j], p[:, j]) for j in keep])) if keep else float("nan")


def mean_auc(y, p):
    """The mean over labels of each label's ROC AUC (column-wise AUC)."""
    from sklearn.metrics import roc_auc_score

    return _per_label(roc_auc_score, y, p)


def mean_average_precision(y, p):
    """mAP: the mean over labels of each label's average precision (area under its precision-recall curve)."""
    from sklearn.metrics import average_precision_score

    return _per_label(average_precision_score, y, p)


def _values(p):
    p = np.asarray(p, dtype=float)
    if p.ndim == 2:  # class probabilities -> expected value
        return p @ np.arange(p.shape[1])
    return p


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable
    higher_is_better: bool

    def __call__(self, y, p) -> float:
        return self.fn(y, p)

    def better(self, a: float, b: float | None) -> bool:
        """Is score ``a`` better than ``b`` (None = no score yet)?"""
        if b is None or np.isnan(b):
            return True
        return a > b if self.higher_is_better else a < b


METRICS = {
    "accuracy": Metric("accuracy", accuracy, True),
    "logloss": Metric("logloss", logloss, False),
    "auc": Metric("auc", auc, True),
    "rmse": Metric("rmse", rmse, False),
    "mae": Metric("mae", mae, False),
    "qwk": Metric("qwk", qwk, True),
    "macro_f1": Metric("macro_f1", macro_f1, True),
    "micro_f1": Metric("micro_f1", micro_f1, True),
    "map": Metric("map", mean_average_precision, True),
    "mean_auc": Metric("mean_auc", mean_auc, True),
}


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric '{name}'; choose one of {', '.join(sorted(METRICS))}") from None


# ----------------------------------------------------------------- what the fold-mean submission scores
def ambiguity(preds: list) -> float:
    """The mean, over rows, of the variance of several models' predictions (summed over classes for class
    probabilities): how much the models disagree."""
    p = np.stack([np.asarray(x, dtype=float) for x in preds])  # (models, rows) or (models, rows, classes)
    var = p.var(axis=0)
    return float(var.reshape(len(var), -1).sum(axis=1).mean())


def squared_error(y, p, probabilities: bool) -> float:
    """MSE of values, or the Brier score of class probabilities (summed over classes, one-hot truth)."""
    p = np.asarray(p, dtype=float)
    if label_sets(y):  # summed over labels, as the ambiguity is
        return float(((p - np.asarray(y, dtype=float)) ** 2).sum(axis=1).mean())
    if probabilities and p.ndim == 2:
        truth = np.eye(p.shape[1])[np.asarray(y).astype(int)]
        return float(((p - truth) ** 2).sum(axis=1).mean())
    return float(((p - np.asarray(y, dtype=float)) ** 2).mean())


def fold_mean_estimate(metric: str, y, oofs: list, test_preds: list, probabilities: bool) -> dict:
    """What the mean of ``test_preds`` (the M test models' predictions) should score, from the OOF rows and
    the models' disagreement on the test rows. ``oofs``: one OOF prediction per repeat of the folds.

    - squared error (MSE, or the Brier score of probabilities): exact, by the ambiguity decomposition (the
      squared error of a mean of models = the mean of their squared errors - the variance among them, for
      every row and so for the mean over rows), with CV standing in for the single models' error;
    - ``rmse``: the root of that; ``mae``: an approximation (CV MAE scaled as the root of the MSE's fall);
    - any other metric, with repeats (R >= 2 OOF predictions per row, each from a model that never saw the
      row): an estimate. s1 = the mean of the repeats' CVs (one model), sR = the score of their mean (an
      honest OOF of an R-model ensemble); the score moves in 1/models, as squared error does in expectation:
      predicted = s1 + (sR - s1) (1 - 1/M) / (1 - 1/R). Without repeats no estimate is made."""
    get = get_metric(metric)
    amb = ambiguity(test_preds) if len(test_preds) > 1 else 0.0
    single = float(np.mean([squared_error(y, o, probabilities) for o in oofs]))
    m, r = len(test_preds), len(oofs)
    out = {"models": m, "repeats": r, "ambiguity": amb, "squared_error": "brier" if probabilities else "mse",
           "single_cv": single, "fold_mean": max(single - amb, 0.0), "metric": metric, "predicted": None,
           "how": "none: no identity for this metric (set folds.repeats: 2 for an estimate); the squared error's "
                  "decomposition is shown"}
    if r > 1:
        s1 = float(np.mean([get(y, o) for o in oofs]))
        sr = get(y, np.mean([np.asarray(o, dtype=float) for o in oofs], axis=0))
        out.update(single_score=s1, repeat_ensemble=float(sr))
    if metric == "rmse":
        out.update(predicted=float(np.sqrt(out["fold_mean"])), how="exact: sqrt(CV MSE - test ambiguity)")
    elif metric == "mae" and single > 0:
        out.update(predicted=float(np.mean([mae(y, o) for o in oofs]) * np.sqrt(out["fold_mean"] / single)),
                   how="approximate: CV MAE * sqrt((CV MSE - test ambiguity) / CV MSE)")
    elif r > 1:
        out.update(predicted=float(s1 + (sr - s1) * (1 - 1 / max(m, 1)) / (1 - 1 / r)),
                   how=f"estimate: {r} repeats' CV {s1:.4f} and their OOF mean's {sr:.4f}, extrapolated in "
                       f"1/models to {m} models")
    return out


def lifted_estimate(cv: float, inputs: dict, fed: dict, what: str = "level-2") -> dict:
    """What a model built on other predictions (a stack, post-processing) should score as a submission. It
    was scored on its inputs' OOF predictions; its test rows get their fold means, which score better by the
    lift each input's own estimate predicts (``inputs``: each input's estimate; ``fed``: the score of the OOF
    it was fed). So: CV + the mean over inputs of (predicted submission - fed OOF score). An estimate for every
    metric: no identity carries through a fitted model."""
    missing = [e for e, s in inputs.items() if not s or s.get("predicted") is None]
    if missing:
        return {"predicted": None, "lift": None,
                "how": f"none: input {missing[0]} has no predicted submission score (an accuracy-like metric needs "
                       "folds.repeats: 2 at level 1; features made before the estimate existed need remaking)"}
    lift = float(np.mean([inputs[e]["predicted"] - fed[e] for e in inputs]))
    return {"predicted": float(cv + lift), "lift": lift, "inputs": {e: inputs[e]["predicted"] for e in inputs},
            "how": f"estimate: {what} CV {cv:.4f} + its inputs' mean lift from OOF to fold mean {lift:+.4f}"}
