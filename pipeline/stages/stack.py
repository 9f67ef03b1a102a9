"""``make stack``: a level-2 model on the OOF features of level-1 experiments, with the SAME folds.

Level 2 = LightGBM (default), ridge/logistic regression, or a weighted average of the experiments'
predictions with non-negative weights summing to 1, fitted on OOF. Features made with another folds
file, or whose rows did not come from their own held-out fold, are refused. The result is written as
just another feature set (``features/<name>/oof.parquet`` and ``test.parquet``, columns
``<name>__<head>__<j>__mean``), so it can be submitted, blended or stacked again. The fitted models
are saved too (``models/fold<k>.txt``, ``refit.txt``, ``level2.json``): a Kaggle bundle redoes the
level-2 test predictions from them alone.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.competition.tables import competition_key, fold_of, load_folds, load_test, load_train, truth
from pipeline.errors import InputError
from pipeline.level2.models import LEVEL2_MODELS, SAVED, Level2Data, category_text, stage_models
from pipeline.metrics import get_metric, lifted_estimate
from pipeline.store import leaderboard, plots
from pipeline.store.artifacts import ArtifactGroup, inherited_leak, require_complete, stage_lock
from pipeline.store.io import (
    config_hash,
    is_up_to_date,
    log,
    provenance,
    read_json,
    read_parquet_meta,
    resolved_config_text,
)
from pipeline.store.paths import (
    features_dir,
    head_prediction,
    main_head,
    prediction_frame,
    stack_inputs,
    stack_name,
)
from pipeline.tasks import head_kind, task_of

if TYPE_CHECKING:
    from pipeline.config.schema import Config


def load_level1(cfg: Config, exp: str, folds_df: pd.DataFrame, folds_hash: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """An experiment's OOF and test features, refusing any that could leak into level 2."""
    d = features_dir(cfg, exp)
    oof_p, test_p = d / "oof.parquet", d / "test.parquet"
    require_complete(d, ["oof.parquet", "test.parquet"], f"features for experiment '{exp}'",
                     "run `make features CONFIG=<its config>` first")
    meta = read_parquet_meta(oof_p)
    if meta.get("folds_hash") != folds_hash:
        raise InputError(f"{oof_p} was made with folds file hash {meta.get('folds_hash')}, not the current "
                         f"{folds_hash}: level 2 must use the SAME folds as level 1. Rebuild that experiment's "
                         "models and features with the current folds file.")
    oof, test = pd.read_parquet(oof_p), pd.read_parquet(test_p)
    id_col = cfg.competition.id
    if "fold" not in oof.columns:
        raise InputError(f"{oof_p} has no 'fold' column, so its rows cannot be shown to be out-of-fold.")
    expected = folds_df.set_index(id_col)["fold"].reindex(oof[id_col]).to_numpy()
    bad = oof["fold"].to_numpy() != expected
    if bad.any():
        raise InputError(f"{oof_p}: row id '{oof[id_col][bad].iloc[0]}' was predicted by the model of fold "
                         f"{oof['fold'][bad].iloc[0]}, but belongs to fold {expected[bad][0]}: that model trained on "
                         "it (an in-fold leak). Level 2 refuses it; regenerate the features with `make features`.")
    return oof.drop(columns=["fold"]), test, meta


def tabular(cfg: Config, train_df: pd.DataFrame, test_df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    comp = cfg.competition
    cols = list(comp.tabular)
    tr, te = train_df[cols].copy(), test_df[cols].copy()
    cats = [c for c in cols if c in comp.categorical or tr[c].dtype == object]
    for c in cats:  # as written: an integer code read as float (a blank cell elsewhere) is the same level
        tr[c], te[c] = category_text(tr[c]), category_text(te[c])
        cat = pd.CategoricalDtype(sorted(set(tr[c].dropna()) | set(te[c].dropna())))
        tr[c], te[c] = tr[c].astype(cat), te[c].astype(cat)
    return tr, te, cats


def run(cfg: Config, force: bool = False) -> Path:
    with stage_lock(features_dir(cfg, stack_name(cfg))):
        return _run(cfg, force)


# (over 60 lines on purpose: the stage's story in order, inputs -> key -> up-to-date check -> work -> one
# commit; the work itself is in the helpers above and below)
def _run(cfg: Config, force: bool) -> Path:
    scfg = cfg.stack
    comp = cfg.competition
    name, id_col, head = stack_name(cfg), comp.id, main_head(cfg)
    task = task_of(cfg).level2  # what level 2 fits (an ordinal target is regressed)
    metric = get_metric(comp.metric)
    exps = stack_inputs(cfg)
    out = features_dir(cfg, name)
    train_df = load_train(cfg, check_images=False)
    test_df = load_test(cfg, check_images=False)
    folds_df, folds_hash = load_folds(cfg)
    fold = fold_of(cfg, train_df, folds_df)
    metas = {}
    X_parts, T_parts = [], []
    for exp in exps:
        oof, test, metas[exp] = load_level1(cfg, exp, folds_df, folds_hash)
        X_parts.append(train_df[[id_col]].merge(oof, on=id_col, how="left").drop(columns=[id_col]))
        T_parts.append(test_df[[id_col]].merge(test, on=id_col, how="left").drop(columns=[id_col]))
    key = config_hash([scfg, competition_key(comp), folds_hash, [metas[e].get("stage_key") for e in exps], cfg.seed]
                      + (["nested choice"] if scfg.model == "auto" else []))  # earlier auto stacks are stale
    if not force and is_up_to_date(out / "meta.json", key, [out / "oof.parquet", out / "test.parquet",
                                                          out / "models" / SAVED]):
        log(f"[stack] up to date: {out}")
        return out
    started = time.time()
    X, T = pd.concat(X_parts, axis=1), pd.concat(T_parts, axis=1)
    if scfg.use_tabular and comp.tabular:
        tr_tab, te_tab, _ = tabular(cfg, train_df, test_df)
        X, T = pd.concat([X, tr_tab], axis=1), pd.concat([T, te_tab.reset_index(drop=True)], axis=1)
    X.columns = T.columns = [str(c) for c in X.columns]
    y = truth(cfg, train_df)
    n_classes = {"classes": lambda: int(comp.num_classes or (y.max() + 1)), "columns": lambda: y.shape[1]}.get(
        head_kind(task).outputs, lambda: 1)()  # outputs: a probability per class or per label, else one
    model_kind = scfg.model
    blend = model_kind in ("weighted", "auto")
    data = Level2Data(X, T, y, fold, task, n_classes, exps,
                      [head_prediction(x_df, e, head, scfg.stat) for e, x_df in zip(exps, X_parts)] if blend else [],
                      [head_prediction(t_df, e, head, scfg.stat) for e, t_df in zip(exps, T_parts)] if blend else [],
                      scfg, cfg.seed, metric)
    result = LEVEL2_MODELS[model_kind](data)
    oof_pred, test_pred, best_iters = result.oof, result.test, result.best_iterations
    per_fold = {f"fold{k}": metric(y[fold == k], oof_pred[fold == k]) for k in sorted(np.unique(fold))}
    cv = {"overall": metric(y, oof_pred), **per_fold}
    guard = versus_best_input(metric, y, fold, oof_pred, {e: head_prediction(x_df, e, head, scfg.stat)
                                                          for e, x_df in zip(exps, X_parts)})
    result.info = {**result.info, "versus_best_input": guard}
    level1 = {e: read_json(features_dir(cfg, e) / "cv.json") if (features_dir(cfg, e) / "cv.json").exists() else {}
              for e in exps}
    inputs = {e: c.get("overall", {}) for e, c in level1.items()}
    submission = lifted_estimate(cv["overall"], {e: c.get("submission") for e, c in level1.items()},
                                     {e: metric(y, head_prediction(x_df, e, head, "mean")) for e, x_df in zip(exps, X_parts)})
    leak = inherited_leak(metas)
    write_outputs(cfg, out, key, folds_hash, oof_pred, test_pred, fold, train_df, test_df, cv, inputs, best_iters,
                  result.info, save_models=lambda group: stage_models(group, out / "models", data, result), leak=leak,
                  submission=submission)
    leaderboard.record(cfg, "stack", started, cv=cv["overall"], folds=per_fold, experiment=name,
                       predicted=submission["predicted"], predicted_how=submission["how"],
                       artifacts=[str(out / "oof.parquet"), str(out / "test.parquet")],
                       note="; ".join(filter(None, [f"{result.info.get('chosen', model_kind)} on {', '.join(exps)}",
                                                    None if guard["wins"] else
                                                    f"does not beat its input {guard['best_input']}", leak])))
    if result.importance is not None:
        plots.save_figure(out / "importance.png", plots.importance(result.importance, name))
    lines = [f"[stack] {name} ({model_kind}) level-2 CV {metric.name}: {cv['overall']:.4f} "
             f"(folds: {', '.join(f'{v:.4f}' for v in per_fold.values())})",
             "[stack] the fold-mean submission: " + (f"predicted {metric.name} {submission['predicted']:.4f} ("
                                                      if submission["predicted"] is not None else "")
             + submission["how"] + (")" if submission["predicted"] is not None else "")]
    for e, c in inputs.items():
        if c:
            no_tta, tta = c.get("no_tta", float("nan")), c.get("tta", float("nan"))
            lines.append(f"        level-1 {e}: {no_tta:.4f} no TTA, {tta:.4f} TTA mean")
    if not guard["wins"]:
        verdict = "does not beat" if guard["ties"] else "is WORSE than"
        lines.append(f"[stack] WARNING: level 2 ({cv['overall']:.4f}) {verdict} its best input {guard['best_input']} "
                     f"({guard['best_input_cv']:.4f}) on the same rows and folds, and wins only "
                     f"{guard['folds_won']}/{len(per_fold)} folds. Submit {guard['best_input']} instead"
                     + (", or try stack.model=auto (the weighted blend or LightGBM, by CV)." if model_kind in ("lgbm", "linear")
                        else "."))
    else:
        lines.append(f"[stack] level 2 beats its best input {guard['best_input']} ({guard['best_input_cv']:.4f}) by "
                     f"{abs(cv['overall'] - guard['best_input_cv']):.4f}, on {guard['folds_won']}/{len(per_fold)} folds")
    log("\n".join(lines))
    return out


def versus_best_input(metric, y, fold, oof_pred, inputs: dict) -> dict:
    """Level 2 against its best input, scored on the same rows with the same folds."""
    scores = {e: metric(y, p) for e, p in inputs.items()}
    sign = 1 if metric.higher_is_better else -1
    best = max(scores, key=lambda e: sign * scores[e])
    won = sum(sign * metric(y[fold == k], oof_pred[fold == k]) > sign * metric(y[fold == k], inputs[best][fold == k])
              for k in np.unique(fold))
    return {"best_input": best, "best_input_cv": float(scores[best]), "inputs_cv": scores, "folds_won": int(won),
            "wins": bool(sign * metric(y, oof_pred) > sign * scores[best]),
            "ties": bool(np.isclose(metric(y, oof_pred), scores[best], rtol=0, atol=1e-12))}


def write_outputs(cfg, out, key, folds_hash, oof_pred, test_pred, fold, train_df, test_df, cv, inputs, best_iters,
                  info, save_models=None, leak=None, submission=None):
    name, id_col, head = stack_name(cfg), cfg.competition.id, main_head(cfg)

    oof = prediction_frame(train_df[id_col].to_numpy(), id_col, name, head, oof_pred, fold)
    meta = provenance(cfg, "stack", key, folds_hash=folds_hash, cv=cv, inputs=inputs, best_iterations=best_iters,
                      experiments=stack_inputs(cfg), name=name, model=cfg.stack.model, level2=info, leak=leak)
    with ArtifactGroup(out / "meta.json") as group:
        group.parquet(out / "oof.parquet", oof, meta)
        group.parquet(out / "test.parquet", prediction_frame(test_df[id_col].to_numpy(), id_col, name, head, test_pred),
                      meta)
        group.json(out / "cv.json", {"overall": {"tta": cv["overall"], "no_tta": cv["overall"]}, **{
            k: {"tta": v, "no_tta": v} for k, v in cv.items() if k != "overall"}, "submission": submission})
        group.text(out / "config.yaml", resolved_config_text(cfg))
        if save_models is not None:  # models/: the fitted level-2 models (per fold, refit), for a Kaggle bundle
            save_models(group)
        group.commit(meta)
