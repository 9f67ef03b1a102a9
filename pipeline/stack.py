"""``make stack``: a level-2 model on the OOF features of level-1 experiments, with the SAME folds.

Level 2 = LightGBM (default), ridge/logistic regression, or a weighted average of the experiments'
predictions with non-negative weights summing to 1, fitted on OOF. Features made with another folds
file, or whose rows did not come from their own held-out fold, are refused. The result is written as
just another feature set (``features/<name>/oof.parquet`` and ``test.parquet``, columns
``<name>__<head>__<j>__mean``), so it can be submitted, blended or stacked again.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import leaderboard
from .competition import InputError, load_test, load_train
from .config import config_hash, stack_inputs, stack_name, targets
from .folds import load_folds
from .io import (head_prediction, is_up_to_date, log, provenance, read_json, read_parquet_meta, save_figure,
                 write_json, write_parquet, write_resolved_config)
from .metrics import get_metric

# the atmaCup11 author's settings: gbdt, 31 leaves, lr 0.05, feature_fraction 0.9, bagging 0.8 every 5
LGBM_DEFAULTS = {"learning_rate": 0.05, "num_leaves": 31, "feature_fraction": 0.9, "bagging_fraction": 0.8,
                 "bagging_freq": 5, "min_child_samples": 20, "n_estimators": 2000, "verbose": -1,
                 "early_stopping_rounds": 20, "num_threads": 0}


def load_level1(cfg: dict, exp: str, folds_df: pd.DataFrame, folds_hash: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """An experiment's OOF and test features, refusing any that could leak into level 2."""
    d = Path("features") / exp
    oof_p, test_p = d / "oof.parquet", d / "test.parquet"
    if not oof_p.exists() or not test_p.exists():
        raise InputError(f"{d}: no features for experiment '{exp}'; run `make features CONFIG=<its config>` first.")
    meta = read_parquet_meta(oof_p)
    if meta.get("folds_hash") != folds_hash:
        raise InputError(f"{oof_p} was made with folds file hash {meta.get('folds_hash')}, not the current "
                         f"{folds_hash}: level 2 must use the SAME folds as level 1. Rebuild that experiment's "
                         "models and features with the current folds file.")
    oof, test = pd.read_parquet(oof_p), pd.read_parquet(test_p)
    id_col = cfg["competition"]["id"]
    if "fold" not in oof.columns:
        raise InputError(f"{oof_p} has no 'fold' column, so its rows cannot be shown to be out-of-fold.")
    expected = folds_df.set_index(id_col)["fold"].reindex(oof[id_col]).to_numpy()
    bad = oof["fold"].to_numpy() != expected
    if bad.any():
        raise InputError(f"{oof_p}: row id '{oof[id_col][bad].iloc[0]}' was predicted by the model of fold "
                         f"{oof['fold'][bad].iloc[0]}, but belongs to fold {expected[bad][0]}: that model trained on "
                         "it (an in-fold leak). Level 2 refuses it; regenerate the features with `make features`.")
    return oof.drop(columns=["fold"]), test, meta


def tabular(cfg: dict, train_df: pd.DataFrame, test_df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    comp = cfg["competition"]
    cols = list(comp["tabular"])
    tr, te = train_df[cols].copy(), test_df[cols].copy()
    cats = [c for c in cols if c in comp["categorical"] or tr[c].dtype == object]
    for c in cats:
        cat = pd.CategoricalDtype(sorted(set(tr[c].dropna().astype(str)) | set(te[c].dropna().astype(str))))
        tr[c], te[c] = tr[c].astype(str).astype(cat), te[c].astype(str).astype(cat)
    return tr, te, cats


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


def run(cfg: dict, force: bool = False) -> Path:
    scfg = cfg["stack"]
    comp = cfg["competition"]
    name, id_col, target = stack_name(cfg), comp["id"], targets(cfg)[0]
    task = {"ordinal": "regression"}.get(comp["task"], comp["task"])
    metric = get_metric(comp["metric"])
    exps = stack_inputs(cfg)
    out = Path("features") / name
    train_df = load_train(cfg, check_images=False)
    test_df = load_test(cfg, check_images=False)
    folds_df, folds_hash = load_folds(cfg)
    fold = train_df[[id_col]].merge(folds_df, on=id_col, how="left")["fold"].to_numpy()
    metas = {}
    X_parts, T_parts = [], []
    for exp in exps:
        oof, test, metas[exp] = load_level1(cfg, exp, folds_df, folds_hash)
        X_parts.append(train_df[[id_col]].merge(oof, on=id_col, how="left").drop(columns=[id_col]))
        T_parts.append(test_df[[id_col]].merge(test, on=id_col, how="left").drop(columns=[id_col]))
    key = config_hash([scfg, comp, folds_hash, [metas[e].get("stage_key") for e in exps], cfg["seed"]])
    if not force and is_up_to_date(out / "meta.json", key, [out / "oof.parquet", out / "test.parquet"]):
        log(f"[stack] up to date: {out}")
        return out
    started = time.time()
    X, T = pd.concat(X_parts, axis=1), pd.concat(T_parts, axis=1)
    if scfg["use_tabular"] and comp["tabular"]:
        tr_tab, te_tab, _ = tabular(cfg, train_df, test_df)
        X, T = pd.concat([X, tr_tab], axis=1), pd.concat([T, te_tab.reset_index(drop=True)], axis=1)
    X.columns = T.columns = [str(c) for c in X.columns]
    y = train_df[target].to_numpy()
    n_classes = int(comp["num_classes"] or (y.max() + 1)) if task == "multiclass" else 1
    model_kind = scfg["model"]
    shape = (len(X), n_classes) if task == "multiclass" else (len(X),)
    oof_pred = np.zeros(shape)
    test_preds, best_iters, importances = [], [], []
    if model_kind == "weighted":
        head = targets(cfg)[0]
        P = [head_prediction(x_df, e, head, scfg["stat"]) for e, x_df in zip(exps, X_parts)]
        PT = [head_prediction(t_df, e, head, scfg["stat"]) for e, t_df in zip(exps, T_parts)]
        weights_per_fold = []
        for k in sorted(np.unique(fold)):
            tr, va = fold != k, fold == k
            w = optimise_weights([p[tr] for p in P], y[tr], task)
            weights_per_fold.append(w)
            oof_pred[va] = sum(wi * p[va] for wi, p in zip(w, P))
        w_all = optimise_weights(P, y, task)
        test_pred = sum(wi * p for wi, p in zip(w_all, PT))
        log("[stack] weights on OOF: " + ", ".join(f"{e}={w:.3f}" for e, w in zip(exps, w_all)))
    else:
        for k in sorted(np.unique(fold)):
            tr, va = fold != k, fold == k
            if model_kind == "lgbm":
                m = _lgbm_fit(scfg["lgbm"] or {}, task, n_classes, X[tr], y[tr], X[va], y[va], seed=cfg["seed"])
                best_iters.append(int(m.best_iteration))
                oof_pred[va] = m.predict(X[va])
                test_preds.append(m.predict(T))
                importances.append(pd.Series(m.booster.feature_importance("gain"), index=X.columns))
            elif model_kind == "linear":
                oof_pred[va] = _linear(task, X[tr], y[tr], X[va])
                test_preds.append(_linear(task, X[tr], y[tr], T))
            else:
                raise InputError(f"stack.model must be lgbm, linear or weighted, got '{model_kind}'.")
        if model_kind == "lgbm" and scfg["test_mode"] == "refit":
            n_iter = max(1, int(np.mean(best_iters) * scfg["refit_coef"]))
            log(f"[stack] refit on all rows with {n_iter} iterations (mean best iteration × {scfg['refit_coef']})")
            test_pred = _lgbm_fit(scfg["lgbm"] or {}, task, n_classes, X, y, n_estimators=n_iter, seed=cfg["seed"]).predict(T)
        else:
            test_pred = np.mean(test_preds, axis=0)

    per_fold = {f"fold{k}": metric(y[fold == k], oof_pred[fold == k]) for k in sorted(np.unique(fold))}
    cv = {"overall": metric(y, oof_pred), **per_fold}
    inputs = {e: read_json(Path("features") / e / "cv.json").get("overall", {}) if (Path("features") / e / "cv.json").exists()
              else {} for e in exps}
    write_outputs(cfg, out, key, folds_hash, oof_pred, test_pred, fold, train_df, test_df, cv, inputs, best_iters)
    leaderboard.record(cfg, "stack", started, cv=cv["overall"], folds=per_fold, experiment=name,
                       artifacts=[str(out / "oof.parquet"), str(out / "test.parquet")],
                       note=f"{model_kind} on {', '.join(exps)}")
    if importances:
        save_figure(out / "importance.png", plot_importance(pd.concat(importances, axis=1).mean(axis=1), name))
    lines = [f"[stack] {name} ({model_kind}) level-2 CV {metric.name}: {cv['overall']:.4f} "
             f"(folds: {', '.join(f'{v:.4f}' for v in per_fold.values())})"]
    for e, c in inputs.items():
        if c:
            lines.append(f"        level-1 {e}: {c.get('no_tta', float('nan')):.4f} no TTA, {c.get('tta', float('nan')):.4f} TTA mean")
    log("\n".join(lines))
    return out


def write_outputs(cfg, out, key, folds_hash, oof_pred, test_pred, fold, train_df, test_df, cv, inputs, best_iters):
    name, id_col, head = stack_name(cfg), cfg["competition"]["id"], targets(cfg)[0]

    def frame(ids, pred):
        pred = pred.reshape(len(pred), -1)
        df = pd.DataFrame({id_col: ids})
        for j in range(pred.shape[1]):
            df[f"{name}__{head}__{j}__mean"] = pred[:, j]
        return df

    oof = frame(train_df[id_col].to_numpy(), oof_pred)
    oof.insert(1, "fold", fold)
    meta = provenance(cfg, "stack", key, folds_hash=folds_hash, cv=cv, inputs=inputs, best_iterations=best_iters,
                      experiments=stack_inputs(cfg), name=name)
    write_parquet(out / "oof.parquet", oof, meta)
    write_parquet(out / "test.parquet", frame(test_df[id_col].to_numpy(), test_pred), meta)
    write_json(out / "cv.json", {"overall": {"tta": cv["overall"], "no_tta": cv["overall"]}, **{
        k: {"tta": v, "no_tta": v} for k, v in cv.items() if k != "overall"}})
    write_resolved_config(out / "config.yaml", cfg)
    write_json(out / "meta.json", meta)


def plot_importance(imp: pd.Series, title: str, top: int = 30):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imp = imp.sort_values(ascending=True).tail(top)
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(imp) + 1.2))
    ax.barh(imp.index, imp.to_numpy(), color="tab:green")
    ax.set(title=f"{title}: LightGBM gain importance (mean over folds)", xlabel="gain")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig
