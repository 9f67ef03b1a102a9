"""Competition metrics. Each takes the true targets and a prediction as the stages produce it:

- binary: probability of class 1, shape (n,)
- multiclass: class probabilities, shape (n, C)
- regression / ordinal: values, shape (n,)

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


def logloss(y, p, eps=1e-15):
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    if p.ndim == 1:
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
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(y).astype(int), to_labels(p), average="macro"))


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
}


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric '{name}'; choose one of {', '.join(sorted(METRICS))}") from None
