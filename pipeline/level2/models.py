"""Level-2 models, chosen by ``stack.model`` from ``LEVEL2_MODELS``.

Each takes the level-2 inputs (``Level2Data``: OOF feature matrix X, test matrix T, target, folds,
and each level-1 experiment's own prediction) and returns OOF predictions made fold by fold with the
SAME folds as level 1, plus test predictions. Adding a model: one function + one ``register`` line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import InputError
from pipeline.registry import Registry
from pipeline.store.artifacts import kill_point
from pipeline.store.io import log, read_json
from pipeline.tasks import head_kind

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
    score: object = None  # the competition metric (y, pred) -> float, for `auto`


@dataclass
class Level2Result:
    oof: np.ndarray
    test: np.ndarray
    best_iterations: list[int] = field(default_factory=list)
    importance: pd.Series | None = None
    info: dict = field(default_factory=dict)  # recorded in the level-2 meta (weights, refit iterations)
    models: dict = field(default_factory=dict)  # fitted models stack saves ("fold<k>", "refit"): objects with .save(path)


# Level 2 sees few rows and strongly correlated inputs: the defaults are regularised for small data
# (fewer leaves, an L2 penalty, column and row subsampling) and stop early on an INNER split of each
# fold's training rows, never on the fold being scored (stack.lgbm overrides any of them).
LGBM_DEFAULTS = {"learning_rate": 0.03, "num_leaves": 15, "feature_fraction": 0.8, "bagging_fraction": 0.8,
                 "bagging_freq": 5, "min_child_samples": 20, "lambda_l2": 1.0, "n_estimators": 2000, "verbose": -1,
                 "early_stopping_rounds": 50, "num_threads": 0, "inner_valid": 0.2}


class _Booster:
    """A trained LightGBM booster with the prediction shape the metrics expect."""

    def __init__(self, booster, task):
        self.booster, self.task = booster, task
        self.best_iteration = booster.best_iteration or booster.current_iteration()
        self.iterations = [self.best_iteration]

    def predict(self, X):
        return self.booster.predict(X, num_iteration=self.best_iteration)

    def importance(self) -> np.ndarray:
        return self.booster.feature_importance("gain")

    def text(self) -> str:
        return self.booster.model_to_string(num_iteration=self.best_iteration)

    def save(self, path) -> None:
        """LightGBM's text format, cut at the best iteration (a loaded copy predicts exactly as this one)."""
        self.booster.save_model(str(path), num_iteration=self.best_iteration)


# a label set's level 2 is one binary booster per label, saved in one file: their texts in label order
LABEL_SEPARATOR = "\n### next label ###\n"


class _PerLabel:
    """One binary LightGBM booster per label of a label set; predicts (rows, labels)."""

    def __init__(self, boosters: list[_Booster]):
        self.boosters = boosters
        self.iterations = [b.best_iteration for b in boosters]
        self.best_iteration = int(round(np.mean(self.iterations)))

    def predict(self, X):
        return np.column_stack([b.predict(X) for b in self.boosters])

    def importance(self) -> np.ndarray:
        return np.sum([b.importance() for b in self.boosters], axis=0)

    def save(self, path) -> None:
        Path(path).write_text(LABEL_SEPARATOR.join(b.text() for b in self.boosters))


def _lgbm_fit(params, task, n_classes, X, y, Xv=None, yv=None, n_estimators=None, seed=0):
    """LightGBM through its native API (stable across versions); early stopping on the held-out fold.
    ``n_estimators``: trees (a list: one per label of a label set, as ``iterations`` gives them)."""
    if head_kind(task).outputs == "columns":  # a label set: each label is its own binary problem
        rounds = n_estimators if isinstance(n_estimators, list) else [n_estimators] * y.shape[1]
        return _PerLabel([_lgbm_fit(params, "binary", 2, X, y[:, j], Xv, None if yv is None else yv[:, j], rounds[j],
                                    seed) for j in range(y.shape[1])])
    import lightgbm as lgb

    p = {**LGBM_DEFAULTS, "seed": seed, **params}
    p.pop("inner_valid", None)
    if isinstance(n_estimators, list):
        n_estimators = n_estimators[0]
    rounds = int(n_estimators if n_estimators is not None else p.pop("n_estimators"))
    p.pop("n_estimators", None)
    es = int(p.pop("early_stopping_rounds", 20))
    p["objective"] = task  # a task's level-2 kind is named as LightGBM's objective (tasks.Task.level2)
    if head_kind(task).outputs == "classes":
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
    kind = head_kind(task)
    if kind.outputs == "columns":  # a label set: a logistic regression per label (a label these rows hold only
        # one value of, e.g. a rare one held by one fold: that value)
        return np.column_stack([_linear("binary", X, y[:, j], Xt) if len(np.unique(y[:, j])) > 1
                                else np.full(len(Xt), float(y[0, j])) for j in range(y.shape[1])])
    est = LogisticRegression(max_iter=2000, C=1.0) if kind.classes else Ridge(alpha=1.0)
    model = make_pipeline(pre, est).fit(X, y)
    if kind.outputs == "classes":
        return model.predict_proba(Xt)
    if kind.classes:  # one probability: the positive class's
        return model.predict_proba(Xt)[:, 1]
    return model.predict(Xt)


def optimise_weights(preds: list[np.ndarray], y: np.ndarray, task: str) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise logloss (classification) or MSE on OOF."""
    from scipy.optimize import minimize

    from pipeline.metrics import logloss

    def loss(w):
        w = np.abs(w) / np.abs(w).sum()
        blend = sum(wi * p for wi, p in zip(w, preds))
        return logloss(y, blend) if head_kind(task).classes else float(np.mean((blend - y) ** 2))

    n = len(preds)
    res = minimize(loss, np.ones(n) / n, method="SLSQP", bounds=[(0, 1)] * n,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}])
    w = np.clip(res.x, 0, None)
    return w / w.sum()




def _empty(d: Level2Data) -> np.ndarray:
    return np.zeros((len(d.X), d.n_classes) if head_kind(d.task).outputs in ("classes", "columns") else (len(d.X),))


def _inner_split(tr: np.ndarray, fraction: float, seed: int, k) -> tuple[np.ndarray, np.ndarray]:
    """Indices of fold k's training rows split into (fit, early-stopping) parts, reproducibly."""
    rows = np.flatnonzero(tr)
    rng = np.random.default_rng([seed, int(k) if str(k).isdigit() else 99])
    stop = rng.random(len(rows)) < fraction
    return rows[~stop], rows[stop]


def _fit_fold(d: Level2Data, tr: np.ndarray, k):
    """Early stopping on an inner split of the training rows picks the number of trees; then the model is
    refit on every training row with that many trees. The scored fold plays no part in either."""
    params = d.scfg["lgbm"] or {}
    fraction = float(params.get("inner_valid", LGBM_DEFAULTS["inner_valid"]))
    fit, stop = _inner_split(tr, fraction, d.seed, k)
    probe = _lgbm_fit(params, d.task, d.n_classes, d.X.iloc[fit], d.y[fit], d.X.iloc[stop], d.y[stop], seed=d.seed)
    n_iter = [max(1, int(i)) for i in probe.iterations]
    return _lgbm_fit(params, d.task, d.n_classes, d.X[tr], d.y[tr], n_estimators=n_iter, seed=d.seed)


@LEVEL2_MODELS.register("lgbm")
def lgbm(d: Level2Data) -> Level2Result:
    oof, tests, iters, imps, models = _empty(d), [], [], [], {}
    for k in sorted(np.unique(d.fold)):
        tr, va = d.fold != k, d.fold == k
        m = models[f"fold{k}"] = _fit_fold(d, tr, k)
        iters.append(int(m.best_iteration))
        oof[va] = m.predict(d.X[va])
        tests.append(m.predict(d.T))
        imps.append(pd.Series(m.importance(), index=d.X.columns))
        kill_point(f"stack:fold{k}")
    if d.scfg["test_mode"] == "refit":  # (each label of a label set its own mean)
        per_output = np.mean([models[f"fold{k}"].iterations for k in sorted(np.unique(d.fold))], axis=0)
        n_iter = [max(1, int(i * d.scfg["refit_coef"])) for i in per_output]
        n_iter = n_iter[0] if len(n_iter) == 1 else n_iter
        log(f"[stack] refit on all rows with {n_iter} iterations (mean best iteration × {d.scfg['refit_coef']})")
        models["refit"] = _lgbm_fit(d.scfg["lgbm"] or {}, d.task, d.n_classes, d.X, d.y, n_estimators=n_iter,
                                    seed=d.seed)
        test = models["refit"].predict(d.T)
        info = {"test_mode": "refit", "refit_iterations": n_iter}
    else:
        test, info = np.mean(tests, axis=0), {"test_mode": "mean"}
    return Level2Result(oof, test, iters, pd.concat(imps, axis=1).mean(axis=1), info, models)


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


@LEVEL2_MODELS.register("auto")
def auto(d: Level2Data) -> Level2Result:
    """The weighted blend and LightGBM, each fitted fold by fold on the SAME folds; the better OOF score
    wins, the simpler blend on a tie. (Both can be rebuilt from a Kaggle bundle; `linear` is not a
    candidate for that reason.) The choice is itself a fit, so it is nested like everything else: fold k's
    OOF rows come from the candidate that scores better on the OTHER folds' rows, and the CV is that of
    the choosing procedure. The test predictions (and the saved model) come from the choice on every row."""
    sign = 1 if getattr(d.score, "higher_is_better", True) else -1
    names = ("weighted", "lgbm")
    results = {name: LEVEL2_MODELS[name](d) for name in names}

    def pick(rows) -> tuple[str, dict]:
        scores = {n: float(d.score(d.y[rows], results[n].oof[rows])) for n in names}
        return max(scores, key=lambda n: (sign * scores[n], -names.index(n))), scores

    best, scores = pick(np.ones(len(d.y), bool))
    oof, fold_choice = np.array(results[best].oof, dtype=float, copy=True), {}
    for k in sorted(np.unique(d.fold)):
        fold_choice[f"fold{k}"], _ = pick(d.fold != k)
        oof[d.fold == k] = results[fold_choice[f"fold{k}"]].oof[d.fold == k]
    log("[stack] auto: " + ", ".join(f"{n} {v:.4f}" for n, v in scores.items()) + f" -> {best}"
        + ("" if set(fold_choice.values()) == {best} else f" (per fold, on the other folds: {fold_choice})"))
    chosen = results[best]
    chosen.oof = oof
    chosen.info = {**chosen.info, "auto": scores, "chosen": best, "fold_choice": fold_choice}
    return chosen


# ------------------------------------------------------------------- saved level 2 (Kaggle bundles)
SAVED = "level2.json"
def category_text(s: pd.Series) -> pd.Series:
    """A categorical column's values as the text they were written as: an integer code read as a float
    (a column with one blank cell: 1 -> 1.0) is '1' again, so the hidden test set's levels match the
    trained ones. Blanks stay missing."""
    def one(v):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return np.nan
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            return str(int(v))
        text = str(v).strip()
        head, dot, tail = text.partition(".")
        return head if dot and tail and set(tail) == {"0"} and head.lstrip("-").isdigit() else text

    return s.map(one).astype(object)


def as_trained_categories(T: pd.DataFrame, categories: dict, where) -> pd.DataFrame:
    """Categorical columns of ``T`` on the categories level 2 was fitted with (unseen values become missing),
    with a warning naming each column where many values were never seen in training."""
    T = T.copy()
    for c, cats in categories.items():
        text = category_text(T[c])
        seen = text.isna() | text.isin(cats)
        if len(text) and (~seen).mean() > 0.1:
            log(f"[level2] warning: {where}: {int((~seen).sum())} of {len(text)} values of categorical column '{c}' "
                f"were never seen in training (e.g. {text[~seen].iloc[0]!r}; trained: {list(cats)[:5]}); they count "
                "as missing")
        T[c] = text.astype(pd.CategoricalDtype(cats))
    return T


def stage_models(group, folder, d: Level2Data, result: Level2Result) -> None:
    """Stage a stack's fitted models in its artifact group: ``<folder>/fold<k>.txt`` and ``refit.txt``
    (LightGBM text models) and ``level2.json`` (the columns in order, which are categorical, the test
    mode or the blend weights), so ``predict_saved`` redoes the level-2 test predictions from them alone."""
    folder, files = Path(folder), {}
    for name, model in result.models.items():
        group.add(folder / f"{name}.txt", model.save)
        files[name] = f"{name}.txt"
    kind = result.info.get("chosen", d.scfg["model"])  # `auto` saves the model it chose
    spec = {"model": kind, "reproducible": kind in SAVED_MODELS, "task": d.task,
            "n_classes": d.n_classes, "experiments": list(d.experiments), "columns": [str(c) for c in d.T.columns],
            "categorical": [str(c) for c in d.T.columns if isinstance(d.T[c].dtype, pd.CategoricalDtype)],
            "categories": {str(c): [str(v) for v in d.T[c].dtype.categories] for c in d.T.columns
                           if isinstance(d.T[c].dtype, pd.CategoricalDtype)},
            "test_mode": d.scfg["test_mode"], "stat": d.scfg["stat"], "files": files,
            "weights": result.info.get("weights")}
    group.json(folder / SAVED, spec)


# level-2 models whose test predictions can be redone from the saved files alone (a Kaggle bundle's
# notebook does): model name -> (folder, level2.json spec, test features, level-1 predictions) -> prediction.
# A new level-2 model is bundled by registering its predictor here, beside its fit above.
SAVED_MODELS = Registry("a bundled level-2 model")


def predict_saved(folder, T: pd.DataFrame | None, preds: list[np.ndarray] | None = None) -> np.ndarray:
    """Level-2 test predictions from a saved stack (``stage_models``): the mean of its fold models (or its
    refit model) on ``T`` (test features with the stack's columns), or its blend weights on ``preds``
    (each experiment's prediction, in ``experiments`` order)."""
    folder = Path(folder)
    spec = read_json(folder / SAVED)
    if spec["model"] not in SAVED_MODELS:
        raise InputError(f"{folder}: level-2 model '{spec['model']}' cannot be rebuilt from saved files; "
                         f"use stack.model {' or '.join(SAVED_MODELS)} for a bundle.")
    return SAVED_MODELS[spec["model"]](folder, spec, T, preds)


@SAVED_MODELS.register("weighted")
def _saved_blend(folder: Path, spec: dict, T, preds) -> np.ndarray:
    return sum(spec["weights"][e] * p for e, p in zip(spec["experiments"], preds))


@SAVED_MODELS.register("lgbm")
def _saved_lgbm(folder: Path, spec: dict, T: pd.DataFrame, preds) -> np.ndarray:
    missing = [c for c in spec["columns"] if c not in T.columns]
    if missing:
        raise InputError(f"{folder}: the test features lack {len(missing)} column(s) level 2 was fitted on, e.g. "
                         f"{missing[:3]}; they must come from the same level-1 experiments and settings.")
    import lightgbm as lgb

    T = T[spec["columns"]].copy()
    if "categories" in spec:  # the train-time categories exactly (LightGBM maps values onto them by name)
        T = as_trained_categories(T, spec["categories"], folder)
    for c in [c for c in spec["categorical"] if c not in spec.get("categories", {})]:  # a stack saved before
        T[c] = category_text(T[c]).astype("category")
    names = ["refit"] if spec["test_mode"] == "refit" else [n for n in spec["files"] if n != "refit"]

    def predict(file: Path) -> np.ndarray:
        if spec.get("task") and head_kind(spec["task"]).outputs == "columns":  # a label set: a booster per label
            return np.column_stack([lgb.Booster(model_str=text).predict(T)
                                    for text in file.read_text().split(LABEL_SEPARATOR)])
        return lgb.Booster(model_file=str(file)).predict(T)

    return np.mean([predict(folder / spec["files"][n]) for n in names], axis=0)
