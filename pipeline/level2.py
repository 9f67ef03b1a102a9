"""Level-2 models, chosen by ``stack.model`` from ``LEVEL2_MODELS``.

Each takes the level-2 inputs (``Level2Data``: OOF feature matrix X, test matrix T, target, folds,
and each level-1 experiment's own prediction) and returns OOF predictions made fold by fold with the
SAME folds as level 1, plus test predictions. Adding a model: one function + one ``register`` line.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .io import log
from .registry import Registry

LEVEL2_MODELS = Registry("stack.model")


@dataclass
class Level2Data:
    X: pd.DataFrame  # OOF features (+ tabular columns), train.csv order
    T: pd.DataFrame  # the same columns for test rows
    y: np.ndarray
    fold: np.ndarray
    task: str  # multiclass | binary | regression
    n_classes: int
    experiments: list[str]
    preds: list[np.ndarray]  # each experiment's main-head OOF prediction (stack.stat)
    test_preds: list[np.ndarray]
    scfg: dict
    seed: int


@dataclass
class Level2Result:
    oof: np.ndarray
    test: np.ndarray
    best_iterations: list[int] = field(default_factory=list)
    importance: pd.Series | None = None
    info: dict = field(default_factory=dict)  # recorded in the level-2 meta (weights, refit iterations)


# the atmaCup11 author's settings: gbdt, 31 leaves, lr 0.05, feature_fraction 0.9, bagging 0.8 every 5
LGBM_DEFAULTS = {"learning_rate": 0.05, "num_leaves": 31, "feature_fraction": 0.9, "bagging_fraction": 0.8,
                 "bagging_freq": 5, "min_child_samples": 20, "n_estimators": 2000, "verbose": -1,
                 "early_stopping_rounds": 20, "num_threads": 0}


class _Booster:
    """A trained LightGBM booster with the prediction shape the metrics expect."""

    def __init__(self, booster, task):
        self.booster, self.task = booster, task
        self.best_iteration = booster.best_iteration or booster.current_iteration()

    def predict(self, X):
        return self.booster.predict(X, num_iteration=self.best_iteration)


def _lgbm_fit(params, task, n_classes, X, y, Xv=None, yv=None, n_estimators=None, seed=0):
    """LightGBM through its native API (stable across versions); early stopping on the held-out fold."""
    import lightgbm as lgb

    p = {**LGBM_DEFAULTS, "seed": seed, **params}
    rounds = int(n_estimators if n_estimators is not None else p.pop("n_estimators"))
    p.pop("n_estimators", None)
    es = int(p.pop("early_stopping_rounds", 20))
    p["objective"] = {"multiclass": "multiclass", "binary": "binary"}.get(task, "regression")
    if task == "multiclass":
        p["num_class"] = n_classes
    train_set = lgb.Dataset(X, y, categorical_feature="auto", free_raw_data=False)
    valid = [lgb.Dataset(Xv, yv, reference=train_set)] if Xv is not None else []
    callbacks = [lgb.early_stopping(es, verbose=False)] if Xv is not None else []
    booster = lgb.train(p, train_set, num_boost_round=rounds, valid_sets=valid, callbacks=callbacks)
    return _Booster(booster, task)


def _linear(task, X, y, Xt):
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    cats = [c for c in X.columns if str(X[c].dtype) == "category"]
    nums = [c for c in X.columns if c not in cats]
    pre = make_column_transformer((StandardScaler(), nums), (OneHotEncoder(handle_unknown="ignore"), cats))
    est = LogisticRegression(max_iter=2000, C=1.0) if task in ("multiclass", "binary") else Ridge(alpha=1.0)
    model = make_pipeline(pre, est).fit(X, y)
    if task == "multiclass":
        return model.predict_proba(Xt)
    if task == "binary":
        return model.predict_proba(Xt)[:, 1]
    return model.predict(Xt)


def optimise_weights(preds: list[np.ndarray], y: np.ndarray, task: str) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise logloss (classification) or MSE on OOF."""
    from scipy.optimize import minimize

    from .metrics import logloss

    def loss(w):
        w = np.abs(w) / np.abs(w).sum()
        blend = sum(wi * p for wi, p in zip(w, preds))
        return logloss(y, blend) if task in ("multiclass", "binary") else float(np.mean((blend - y) ** 2))

    n = len(preds)
    res = minimize(loss, np.ones(n) / n, method="SLSQP", bounds=[(0, 1)] * n,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}])
    w = np.clip(res.x, 0, None)
    return w / w.sum()




def _empty(d: Level2Data) -> np.ndarray:
    return np.zeros((len(d.X), d.n_classes) if d.task == "multiclass" else (len(d.X),))


@LEVEL2_MODELS.register("lgbm")
def lgbm(d: Level2Data) -> Level2Result:
    oof, tests, iters, imps = _empty(d), [], [], []
    for k in sorted(np.unique(d.fold)):
        tr, va = d.fold != k, d.fold == k
        m = _lgbm_fit(d.scfg["lgbm"] or {}, d.task, d.n_classes, d.X[tr], d.y[tr], d.X[va], d.y[va], seed=d.seed)
        iters.append(int(m.best_iteration))
        oof[va] = m.predict(d.X[va])
        tests.append(m.predict(d.T))
        imps.append(pd.Series(m.booster.feature_importance("gain"), index=d.X.columns))
    if d.scfg["test_mode"] == "refit":
        n_iter = max(1, int(np.mean(iters) * d.scfg["refit_coef"]))
        log(f"[stack] refit on all rows with {n_iter} iterations (mean best iteration × {d.scfg['refit_coef']})")
        test = _lgbm_fit(d.scfg["lgbm"] or {}, d.task, d.n_classes, d.X, d.y, n_estimators=n_iter,
                         seed=d.seed).predict(d.T)
        info = {"test_mode": "refit", "refit_iterations": n_iter}
    else:
        test, info = np.mean(tests, axis=0), {"test_mode": "mean"}
    return Level2Result(oof, test, iters, pd.concat(imps, axis=1).mean(axis=1), info)


@LEVEL2_MODELS.register("linear")
def linear(d: Level2Data) -> Level2Result:
    oof, tests = _empty(d), []
    for k in sorted(np.unique(d.fold)):
        tr, va = d.fold != k, d.fold == k
        oof[va] = _linear(d.task, d.X[tr], d.y[tr], d.X[va])
        tests.append(_linear(d.task, d.X[tr], d.y[tr], d.T))
    return Level2Result(oof, np.mean(tests, axis=0))


@LEVEL2_MODELS.register("weighted")
def weighted(d: Level2Data) -> Level2Result:
    """Non-negative weights summing to 1 over the experiments' predictions, fitted per fold on OOF."""
    oof, per_fold = _empty(d), {}
    for k in sorted(np.unique(d.fold)):
        tr, va = d.fold != k, d.fold == k
        w = optimise_weights([p[tr] for p in d.preds], d.y[tr], d.task)
        oof[va] = sum(wi * p[va] for wi, p in zip(w, d.preds))
        per_fold[f"fold{k}"] = dict(zip(d.experiments, map(float, w)))
    w_all = optimise_weights(d.preds, d.y, d.task)
    log("[stack] weights on OOF: " + ", ".join(f"{e}={w:.3f}" for e, w in zip(d.experiments, w_all)))
    return Level2Result(oof, sum(wi * p for wi, p in zip(w_all, d.test_preds)),
                        info={"weights": dict(zip(d.experiments, map(float, w_all))), "fold_weights": per_fold})
