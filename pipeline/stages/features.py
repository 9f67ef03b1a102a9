"""``make features``: out-of-fold and test outputs of every fold model, with test-time augmentation.

Every train row's features come from the one fold model that never trained on it (its ``fold`` is
recorded per row and checked against the folds file); test features are the mean over fold models
(``features.use_full``: plus the all-data model, or that model alone).
Each TTA view's outputs are aggregated per output as mean/var/max/min (``features.stats``); all views
of a batch go through the network in one forward pass. Columns are named
``<experiment>__<head>__<output>__<stat>``. Outputs: ``features/<experiment>/oof.parquet`` and
``test.parquet`` (keyed by id, provenance in the parquet metadata), ``cv.json``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.competition.images import SharedImages, loader_workers
from pipeline.competition.tables import (
    fold_matrix,
    held_out,
    image_paths,
    load_folds,
    load_test,
    load_train,
    repeat_columns,
    repeat_of,
    table_path,
    truth,
)
from pipeline.errors import InputError
from pipeline.metrics import fold_mean_estimate, get_metric
from pipeline.predict.model_run import ModelRun
from pipeline.predict.tta import aggregate, tta_views
from pipeline.store import leaderboard
from pipeline.store.artifacts import ArtifactGroup, kill_point, stage_lock
from pipeline.store.io import (
    config_hash,
    file_hash,
    is_up_to_date,
    log,
    provenance,
    read_parquet_meta,
    resolved_config_text,
    write_parquet,
)
from pipeline.store.paths import (
    feature_column,
    features_dir,
    head_prediction,
    models_dir,
    parse_column,
)
from pipeline.tasks import HEAD_KINDS
from pipeline.training import teachers
from pipeline.training.checkpoint import Checkpoint
from pipeline.training.fold_models import FULL, FoldModels
from pipeline.training.models import pick_device
from pipeline.training.train_key import images_hash, train_key

if TYPE_CHECKING:
    from pipeline.config.schema import Config


def fit_fold_pca(run: ModelRun, paths, batch_size: int, workers: int, n: int, seed: int = 0):
    """PCA of the pooled embedding, fitted on the fold model's own TRAINING rows only (no leak into
    OOF rows); components get a fixed sign (largest loading positive) so folds' bases roughly agree."""
    from sklearn.decomposition import PCA

    emb = run.predict(paths, batch_size=batch_size, workers=workers, embed=True)["embedding"]
    pca = PCA(n_components=min(n, emb.shape[1], len(emb)), random_state=seed).fit(emb)
    signs = np.sign(pca.components_[np.arange(pca.n_components_), np.abs(pca.components_).argmax(1)])
    pca.components_ *= signs[:, None]
    return pca


def reduce_embedding(outputs: dict, pca) -> dict:
    if pca is not None and "embedding" in outputs:
        outputs = {**outputs, "embedding": pca.transform(outputs["embedding"])}
    return outputs


def run(cfg: Config, force: bool = False) -> Path:
    with stage_lock(features_dir(cfg)):
        return _run(cfg, force)


def _fold_parts(run: _FoldRun, k, parts: Path, pkey: str, force: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fold model k's OOF and test rows: dumped to ``parts/`` once per key, so a run that was killed
    resumes at the first fold it had not finished."""
    part_oof, part_test = parts / f"fold{k}_oof.parquet", parts / f"fold{k}_test.parquet"
    if not force and all(p.exists() and read_parquet_meta(p).get("key") == pkey for p in (part_oof, part_test)):
        log(f"[features] fold {k}: already dumped, reusing {parts}")
    else:
        _dump_fold(run, k, part_oof, part_test, pkey)
    kill_point(f"features:fold{k}")
    return pd.read_parquet(part_oof) if k != "full" else None, pd.read_parquet(part_test)


# (over 60 lines on purpose: the stage's story in order, inputs -> key -> up-to-date check -> work -> one
# commit; the work itself is in the helpers above and below)
def _run(cfg: Config, force: bool) -> Path:
    fcfg = cfg.features
    exp = cfg.name
    id_col = cfg.competition.id
    mdir, out = models_dir(cfg), features_dir(cfg)
    train_df = load_train(cfg, check_images=False)
    test_df = load_test(cfg)
    folds_df, folds_hash = load_folds(cfg)
    matrix = fold_matrix(cfg, train_df, folds_df)  # (rows, repeats): folds.repeats splits, models numbered on
    n_splits = int(matrix.max()) + 1
    fold_models = FoldModels(mdir)
    metas = fold_models.require_folds(n_splits, folds_hash)
    # the rule `train --check` applies: this config, these folds, train.csv, images and teacher
    fold_models.require_current(range(n_splits), train_key(cfg, train_df, folds_hash))
    models, test_models = fold_models.for_test(list(range(n_splits)), fcfg.use_full)
    use_full = FULL in models
    if use_full:
        metas[FULL] = fold_models.meta(FULL)
    key = config_hash([fcfg, [metas[k]["stage_key"] for k in metas], folds_hash, use_full,
                       file_hash(table_path(cfg, "test")), images_hash(cfg, test_df[id_col], "test")])
    # a leaky model's features are leaky (models trained before the mark was recorded: their config says it)
    leak = next((m["leak"] for m in metas.values() if m.get("leak")), None) or teachers.leak_note(cfg)
    oof_path, test_path = out / "oof.parquet", out / "test.parquet"
    if not force and is_up_to_date(out / "meta.json", key, [oof_path, test_path]):
        log(f"[features] up to date: {out}")
        return out

    started = time.time()
    device = pick_device(cfg.train.device)
    views = tta_views(fcfg.tta, fcfg.scales)
    log(f"[features] {exp}: {len(views)} TTA view(s) ({fcfg.tta}), {n_splits} fold models, device {device}")
    paths_train = image_paths(cfg, train_df[id_col], "train")
    paths_test = image_paths(cfg, test_df[id_col], "test")
    parts = out / "parts"
    oof_parts, test_parts = [], []
    if fcfg.use_full == "only":
        log("[features] test rows: the all-data model alone (features.use_full=only); OOF rows: the fold models")
    from tqdm.auto import tqdm

    workers = loader_workers(cfg.data, device)
    test_images = SharedImages(paths_test, cfg.data, workers, "decode test images")

    run = _FoldRun(cfg, fold_models, matrix, paths_train, train_df[id_col].to_numpy(), test_df[id_col].to_numpy(),
                   test_images, views, device, workers)
    for k in tqdm(models, desc=f"features {exp}", leave=False):
        part_oof, part_test = _fold_parts(run, k, parts, config_hash([key, k]), force)
        if k != "full":
            oof_parts.append(part_oof)
        test_parts.append(part_test)

    repeat_oofs = []
    for r, column in enumerate(repeat_columns(folds_df)):  # one full OOF per repeat, each row once
        one = pd.concat([p for p in oof_parts if repeat_of(matrix, p["fold"].iloc[0]) == r], ignore_index=True)
        check_oof(one, train_df, folds_df, id_col, column)
        repeat_oofs.append(train_df[[id_col]].merge(one, on=id_col, how="left"))  # train.csv order
    oof = repeat_mean(repeat_oofs, id_col)  # with repeats: each row's mean over the models that never saw it
    test = test_mean(test_parts, models, test_models, id_col, parts)
    feat_cols = [c for c in test.columns if c != id_col]

    main = Checkpoint.read(fold_models.checkpoint(0), mmap=True).heads[0]
    tables = [score_table(cfg, o, train_df, exp, main.name, matrix[:, r]) for r, o in enumerate(repeat_oofs)]
    cv = repeats_table(tables)
    fold_mean = fold_mean_estimate(cfg.competition.metric, truth(cfg, train_df),
                                   [head_prediction(o, exp, main.name, "mean") for o in repeat_oofs],
                                   [head_prediction(p, exp, main.name, "mean") for p, m in zip(test_parts, models)
                                    if m in test_models], HEAD_KINDS[main.kind].probabilities)
    spread = repeat_spread(tables, fold_mean)
    view_cols = [c for c in oof.columns if (col := parse_column(c)) and col.stat == "view0"]
    meta = provenance(cfg, "features", key, folds_hash=folds_hash, cv=cv, models=[str(m) for m in models],
                      test_models=[str(m) for m in test_models],
                      views=len(views), leak=leak, model_keys={str(k): m.get("stage_key") for k, m in metas.items()},
                      fold_mean=fold_mean, repeats=spread)
    with ArtifactGroup(out / "meta.json") as group:
        group.parquet(oof_path, oof.drop(columns=view_cols), meta)
        group.parquet(test_path, test, meta)
        # each fold model's own test predictions (pseudo-labels for fold k come from fold k's model only)
        group.parquet(out / "test_folds.parquet", pd.concat(
            [p.assign(fold=str(m)) for p, m in zip(test_parts, models)], ignore_index=True), meta)
        group.text(out / "config.yaml", resolved_config_text(cfg))
        group.json(out / "cv.json", {**cv, "submission": fold_mean, **({"repeats": spread} if spread else {})})
        group.json(out / "fold_mean.json", fold_mean)
        group.commit(meta)
    leaderboard.record(cfg, "features", started, cv=cv["overall"]["tta"],
                       folds={k: v["tta"] for k, v in cv.items() if k != "overall"},
                       predicted=fold_mean["predicted"], predicted_how=fold_mean["how"],
                       repeat_std=spread["std"] if spread else None,
                       artifacts=[str(oof_path), str(test_path)], note=f"{len(views)} TTA views; no-TTA CV "
                       f"{cv['overall']['no_tta']:.6f}; {fold_mean_text(fold_mean)}"
                       + ("; test: the all-data model alone" if test_models != models else "")
                       + (f"; {leak}" if leak else ""))
    log(cv_text(cv, get_metric(cfg.competition.metric).name))
    log(f"[features] {fold_mean_text(fold_mean)}")
    if spread:
        log(f"[features] {len(spread['scores'])} repeats: CV " + ", ".join(f"{v:.4f}" for v in spread["scores"])
            + f" (std {spread['std']:.4f}); their OOF mean scores {spread['ensemble']:.4f}")
    log(f"[features] wrote {oof_path} ({oof.shape[0]} rows) and {test_path} ({test.shape[0]} rows), "
        f"{len(feat_cols)} feature columns")
    return out


@dataclass
class _FoldRun:
    """What every fold model's pass over the images shares."""
    cfg: Config
    fold_models: FoldModels
    matrix: np.ndarray  # (rows, repeats): the model holding each row out
    paths_train: list
    train_ids: np.ndarray
    test_ids: np.ndarray
    test_images: SharedImages
    views: list
    device: object
    workers: int


def _dump_fold(run: _FoldRun, k, part_oof: Path, part_test: Path, pkey: str) -> None:
    """Fold ``k``'s model on its held-out train rows (OOF) and on every test row, each with the TTA views."""
    fcfg, exp, id_col = run.cfg.features, run.cfg.name, run.cfg.competition.id
    model = ModelRun(run.fold_models.checkpoint(k), run.device, fold=k)  # as it was trained to see images
    heads, batch = model.heads, fcfg.batch_size
    pca = None
    if fcfg.embedding and fcfg.pca:  # fitted on the model's own training rows (all, for full)
        own = np.flatnonzero(~held_out(run.matrix, k))
        pca = fit_fold_pca(model, [run.paths_train[i] for i in own], batch, run.workers, int(fcfg.pca),
                           run.cfg.seed)

    def views_of(images):
        return reduce_embedding(model.predict(images, run.views, batch, run.workers, fcfg.embedding), pca)

    if k != FULL:
        rows = np.flatnonzero(held_out(run.matrix, k))
        o = views_of([run.paths_train[i] for i in rows])
        ident = {feature_column(exp, h.name, j, "view0"): o[h.name][0][:, j]  # no-TTA output, for the CV table
                 for h in heads for j in range(o[h.name].shape[2])}
        df = pd.concat([pd.DataFrame({id_col: run.train_ids[rows], "fold": k}),
                        aggregate(exp, o, fcfg.stats, fcfg.keep_views), pd.DataFrame(ident)], axis=1)
        write_parquet(part_oof, df, {"key": pkey})
    t = aggregate(exp, views_of(run.test_images), fcfg.stats, fcfg.keep_views)
    write_parquet(part_test, pd.concat([pd.DataFrame({id_col: run.test_ids}), t], axis=1), {"key": pkey})


def test_mean(test_parts: list, models: list, test_models: list, id_col: str, parts: Path) -> pd.DataFrame:
    """The mean of the test models' predictions, column by column (they must have the same columns)."""
    feat_cols = [c for c in test_parts[0].columns if c != id_col]
    for m, part in zip(models, test_parts):  # the test average must add like to like
        if list(part.columns) != list(test_parts[0].columns):
            raise InputError(f"{parts}/fold{m}_test.parquet has other feature columns than fold {models[0]}'s; its "
                             f"models disagree on heads or embedding size. Retrain them together, or rerun with --force.")
    mean = np.mean([p[feat_cols].to_numpy() for p, m in zip(test_parts, models) if m in test_models], axis=0)
    return pd.concat([test_parts[0][[id_col]], pd.DataFrame(mean, columns=feat_cols)], axis=1)


def check_oof(oof: pd.DataFrame, train_df: pd.DataFrame, folds_df: pd.DataFrame, id_col: str,
              column: str = "fold") -> None:
    """Every train id exactly once, each from the model of the fold that held it out (in the repeat whose
    folds are ``column``)."""
    counts = oof[id_col].value_counts()
    if (counts > 1).any():
        raise RuntimeError(f"OOF has id '{counts.index[counts > 1][0]}' {counts.max()} times; each must appear once.")
    missing = set(train_df[id_col]) - set(oof[id_col])
    if missing:
        raise RuntimeError(f"OOF misses {len(missing)} train ids (e.g. {sorted(missing)[:3]}).")
    expected = folds_df.set_index(id_col)[column]
    wrong = oof["fold"].to_numpy() != expected.loc[oof[id_col]].to_numpy()
    if wrong.any():
        raise RuntimeError(f"OOF row '{oof[id_col][wrong].iloc[0]}' came from a model that trained on it.")


def repeat_mean(oofs: list, id_col: str) -> pd.DataFrame:
    """The repeats' OOF frames (train.csv order) averaged column by column; ``fold`` is repeat 0's."""
    if len(oofs) == 1:
        return oofs[0]
    cols = [c for c in oofs[0].columns if c not in (id_col, "fold")]
    mean = pd.DataFrame(np.mean([o[cols].to_numpy(dtype=float) for o in oofs], axis=0), columns=cols)
    return pd.concat([oofs[0][[id_col, "fold"]], mean.astype(oofs[0][cols].dtypes.to_dict())], axis=1)


def repeats_table(tables: list[dict]) -> dict:
    """One CV table over the repeats: every model's fold row, and overall the mean of the repeats' CVs
    (the score of ONE model, as without repeats)."""
    if len(tables) == 1:
        return tables[0]
    rows = {}
    for t in tables:  # fold rows are named by model: repeat r holds models r*K..
        rows.update({name: v for name, v in t.items() if name != "overall"})
    rows["overall"] = {s: float(np.mean([t["overall"][s] for t in tables])) for s in ("no_tta", "tta")}
    return rows


def repeat_spread(tables: list[dict], fold_mean: dict) -> dict | None:
    """Repeat-to-repeat spread of the CV (None without repeats)."""
    if len(tables) == 1:
        return None
    scores = [t["overall"]["tta"] for t in tables]
    return {"scores": scores, "std": float(np.std(scores)), "ensemble": fold_mean.get("repeat_ensemble")}


def score_table(cfg: Config, oof: pd.DataFrame, train_df: pd.DataFrame, exp: str, head: str, fold_of) -> dict:
    metric = get_metric(cfg.competition.metric)
    y = truth(cfg, train_df)
    tta = head_prediction(oof, exp, head, "mean")
    plain = head_prediction(oof, exp, head, "view0")
    rows = {}
    for k in sorted(np.unique(fold_of)):
        m = fold_of == k
        rows[f"fold{k}"] = {"no_tta": metric(y[m], plain[m]), "tta": metric(y[m], tta[m])}
    rows["overall"] = {"no_tta": metric(y, plain), "tta": metric(y, tta)}
    return rows


def fold_mean_text(fm: dict) -> str:
    """One line: what the mean of the test models should score, beside the single-model CV."""
    se = fm["squared_error"].upper() if fm["squared_error"] == "mse" else "Brier"
    text = (f"fold-mean of {fm['models']} model(s): {se} {fm['single_cv']:.4f} (CV, one model) - ambiguity "
            f"{fm['ambiguity']:.4f} (test rows) = {fm['fold_mean']:.4f}")
    if fm["predicted"] is not None:
        text += f"; predicted {fm['metric']} {fm['predicted']:.4f} ({fm['how'].split(':')[0]})"
    return text


def cv_text(cv: dict, metric_name: str) -> str:
    lines = [f"{'':10s} {metric_name + ' no TTA':>18s} {metric_name + ' TTA mean':>18s}"]
    for name, r in cv.items():
        lines.append(f"{name:10s} {r['no_tta']:18.4f} {r['tta']:18.4f}")
    return "\n".join(lines)
