"""``make knn``: a nearest-neighbour feature set from the fold models' embeddings, out of fold.

Fold model k embeds the rows it trained on (its **index**), the rows it held out, and every test row. A
held-out row's neighbours are searched in fold k's index alone, so no row's score comes from a model, or an
index, that saw its label: the OOF rule of level 1 (``pipeline.predict.neighbours`` scores them). Test rows
get the mean over the fold models, each searching its own index. With ``knn.new_label`` (a class meaning "not
a known individual", e.g. ``new_whale``) that class competes at a similarity threshold, tuned on OOF rows
with the same nesting as post-processing: fold k's rows by the threshold tuned on the other folds' rows.

Writes ``features/<name>-knn/`` (``knn.name``): ``oof.parquet`` (with ``fold``), ``test.parquet``, ``cv.json``,
``knn.json`` and ``index/fold<k>.npz`` (each fold's index, which a Kaggle bundle carries). Its columns are
the main head's, ``<set>__<head>__<class>__mean``: it can be submitted, blended and stacked like any set.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.competition.images import SharedImages, loader_workers
from pipeline.competition.tables import (
    class_labels,
    fold_matrix,
    held_out,
    image_paths,
    load_folds,
    load_test,
    load_train,
    num_classes,
    repeat_columns,
    repeat_of,
    table_path,
    truth,
)
from pipeline.errors import InputError
from pipeline.metrics import fold_mean_estimate, get_metric
from pipeline.predict import neighbours
from pipeline.predict.model_run import ModelRun
from pipeline.store import leaderboard
from pipeline.store.artifacts import ArtifactGroup, stage_lock
from pipeline.store.io import config_hash, file_hash, is_up_to_date, log, provenance, resolved_config_text
from pipeline.store.paths import features_dir, main_head, models_dir, prediction_frame
from pipeline.tasks import task_of
from pipeline.training import teachers
from pipeline.training.fold_models import FoldModels
from pipeline.training.models import pick_device
from pipeline.training.train_key import images_hash, train_key

if TYPE_CHECKING:
    from pipeline.config.schema import Config


def knn_name(cfg: Config) -> str:
    return cfg.knn.name or f"{cfg.name}-knn"


def new_class(cfg: Config) -> int | None:
    """The index of ``knn.new_label`` among the classes (a string label, or a class number)."""
    label = cfg.knn.new_label
    if label is None:
        return None
    labels = class_labels(cfg)
    if labels is not None:
        if str(label) not in labels:
            import difflib

            close = difflib.get_close_matches(str(label), labels, n=1)
            raise InputError(f"knn.new_label '{label}' is not a class of {table_path(cfg, 'train')}"
                             + (f"; did you mean '{close[0]}'?" if close else "")
                             + f" ({len(labels)} classes: {', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''})")
        return labels.index(str(label))
    try:
        new = int(label)
    except ValueError:
        new = -1
    n = num_classes(cfg, load_train(cfg, check_images=False))
    if not 0 <= new < n:
        raise InputError(f"knn.new_label {label!r} is not a class of {table_path(cfg, 'train')} (its classes are "
                         f"0..{n - 1}).")
    return new


def run(cfg: Config, force: bool = False) -> Path:
    with stage_lock(features_dir(cfg, knn_name(cfg))):
        return _run(cfg, force)


# (over 60 lines on purpose: the stage's story in order, inputs -> key -> up-to-date check -> work -> one
# commit; the neighbour search itself is pipeline.predict.neighbours')
def _run(cfg: Config, force: bool) -> Path:
    kc, id_col, name = cfg.knn, cfg.competition.id, knn_name(cfg)
    if task_of(cfg).head_kind.outputs != "classes":
        raise InputError(f"make knn: neighbours vote for classes; competition.task={cfg.competition.task} "
                         "has none (use a multiclass competition)")
    out = features_dir(cfg, name)
    if name == cfg.name:
        raise InputError(f"knn.name={name} is this experiment's own name: its kNN set would overwrite its features "
                         f"(features/{name}/); leave knn.name unset ({name}-knn) or pick another name.")
    train_df, test_df = load_train(cfg, check_images=False), load_test(cfg)
    folds_df, folds_hash = load_folds(cfg)
    matrix = fold_matrix(cfg, train_df, folds_df)
    models = list(range(int(matrix.max()) + 1))
    fold_models = FoldModels(models_dir(cfg))
    metas = fold_models.require_folds(len(models), folds_hash)
    fold_models.require_current(models, train_key(cfg, train_df, folds_hash))
    y, n_classes, new = truth(cfg, train_df).astype(int), num_classes(cfg, train_df), new_class(cfg)
    key = config_hash([kc, [metas[k]["stage_key"] for k in models], folds_hash,
                       file_hash(table_path(cfg, "test")), images_hash(cfg, test_df[id_col], "test")])
    if not force and is_up_to_date(out / "meta.json", key, [out / "oof.parquet", out / "test.parquet"]):
        log(f"[knn] up to date: {out}")
        return out
    started = time.time()
    indexes, oof_score, test_score = _search(cfg, fold_models, matrix, models, train_df, test_df, y, n_classes)
    metric = get_metric(cfg.competition.metric)
    repeats = [[m for m in models if repeat_of(matrix, m) == r] for r in range(len(repeat_columns(folds_df)))]
    oofs, thresholds, test_threshold = _oof(matrix, repeats, y, oof_score, n_classes, kc, new, metric)
    tests = [_probs(test_score[m], kc, new, test_threshold) for m in models]
    oof, test = np.mean(oofs, axis=0), np.mean(tests, axis=0)
    head = main_head(cfg)
    cv = {f"fold{m}": {"tta": metric(y[matrix[:, 0] == m], oof[matrix[:, 0] == m]),
                       "no_tta": metric(y[matrix[:, 0] == m], oof[matrix[:, 0] == m])} for m in repeats[0]}
    cv["overall"] = {"tta": metric(y, oof), "no_tta": metric(y, oof)}
    fold_mean = fold_mean_estimate(metric.name, y, oofs, tests, True)
    info = {"k": kc.k, "scale": kc.scale, "n_classes": n_classes, "batch_size": kc.batch_size,
            "new_class": new, "test_threshold": test_threshold,
            "fold_thresholds": {str(m): t for m, t in thresholds.items()},
            "index_rows": {str(m): len(i.classes) for m, i in indexes.items()}}
    # a leaky model's neighbours are leaky (models trained before the mark was recorded: their config says it)
    leak = next((metas[m]["leak"] for m in models if metas[m].get("leak")), None) or teachers.leak_note(cfg)
    meta = provenance(cfg, "knn", key, folds_hash=folds_hash, cv=cv, leak=leak, models=[str(m) for m in models],
                      test_models=[str(m) for m in models], model_keys={str(m): metas[m]["stage_key"] for m in models},
                      knn=info, fold_mean=fold_mean)
    with ArtifactGroup(out / "meta.json") as group:
        group.parquet(out / "oof.parquet", prediction_frame(train_df[id_col].to_numpy(), id_col, name, head, oof,
                                                            matrix[:, 0]), meta)
        group.parquet(out / "test.parquet", prediction_frame(test_df[id_col].to_numpy(), id_col, name, head, test), meta)
        for m, index in indexes.items():
            group.add(out / "index" / f"fold{m}.npz", index.save)
        group.json(out / "knn.json", info)
        group.json(out / "cv.json", {**cv, "submission": fold_mean})
        group.text(out / "config.yaml", resolved_config_text(cfg))
        group.commit(meta)
    leaderboard.record(cfg, "features", started, cv=cv["overall"]["tta"], experiment=name,
                       folds={k: v["tta"] for k, v in cv.items() if k != "overall"},
                       predicted=fold_mean["predicted"], predicted_how=fold_mean["how"],
                       artifacts=[str(out / "oof.parquet"), str(out / "test.parquet")],
                       note=f"kNN (k={kc.k}) on {cfg.name}'s embeddings"
                            + (f"; new-individual threshold {test_threshold:.3f}" if new is not None else "")
                            + (f"; {leak}" if leak else ""))
    log(f"[knn] {name}: CV {metric.name} {cv['overall']['tta']:.4f} (folds: "
        + ", ".join(f"{v['tta']:.4f}" for k, v in cv.items() if k != "overall") + ")"
        + (f"; new-individual threshold {test_threshold:.3f} (per fold: {info['fold_thresholds']})"
           if new is not None else "") + f"; wrote {out}")
    return out


def _search(cfg: Config, fold_models: FoldModels, matrix, models: list, train_df, test_df, y, n_classes: int):
    """Per fold model: its index (the rows it trained on), and the class scores of its held-out rows and of
    every test row, searched in that index alone."""
    from tqdm.auto import tqdm

    kc, id_col = cfg.knn, cfg.competition.id
    device = pick_device(cfg.train.device)
    workers = loader_workers(cfg.data, device)
    paths = image_paths(cfg, train_df[id_col], "train")
    test_images = SharedImages(image_paths(cfg, test_df[id_col], "test"), cfg.data, workers, "decode test images")
    indexes, oof_score, test_score = {}, {}, {}
    for m in tqdm(models, desc=f"knn {knn_name(cfg)}", leave=False):
        run = ModelRun(fold_models.checkpoint(m), device, fold=m)

        def embed(images, run=run):
            return run.predict(images, batch_size=kc.batch_size, workers=workers, embed=True)["embedding"]

        own, rows = np.flatnonzero(~held_out(matrix, m)), np.flatnonzero(held_out(matrix, m))
        indexes[m] = neighbours.Index(neighbours.normalise(embed([paths[i] for i in own])), y[own],
                                      train_df[id_col].to_numpy()[own])
        oof_score[m] = _scores(indexes[m], embed([paths[i] for i in rows]), kc.k, n_classes)
        test_score[m] = _scores(indexes[m], embed(test_images), kc.k, n_classes)
    return indexes, oof_score, test_score


def _oof(matrix, repeats: list[list[int]], y, oof_score: dict, n_classes: int, kc: dict, new: int | None, metric):
    """One full OOF per repeat, each row from the model that held it out, with the new-individual thresholds:
    each model's rows by the threshold tuned on its repeat's other rows (nested), and the test rows' (tuned on
    every OOF row of repeat 0). Returns (OOF per repeat, {model: threshold}, the test threshold)."""
    thresholds, oofs = {}, []
    tune = new is not None and kc.new_threshold is None
    for r, owners in enumerate(repeats):
        score = np.full((len(y), n_classes), -np.inf)
        for m in owners:
            score[matrix[:, r] == m] = oof_score[m]
        if tune:
            for m in owners:
                rest = matrix[:, r] != m
                thresholds[m] = neighbours.tune_threshold(metric, y[rest], score[rest], kc.scale, new)
        probs = np.empty(score.shape)
        for m in owners:
            mine = matrix[:, r] == m
            probs[mine] = _probs(score[mine], kc, new, thresholds.get(m, kc.new_threshold))
        oofs.append(probs)
        if r == 0 and tune:
            test_threshold = neighbours.tune_threshold(metric, y, score, kc.scale, new)
    return oofs, thresholds, test_threshold if tune else kc.new_threshold


def _scores(index: neighbours.Index, queries: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """Each row's class scores (the best neighbour similarity per class), before any threshold."""
    sims, rows = index.search(queries, k)
    return neighbours.class_scores(sims, index.classes[rows], n_classes)


def _probs(score: np.ndarray, kc: dict, new: int | None, threshold: float | None) -> np.ndarray:
    return neighbours.probabilities(neighbours.with_threshold(score, new, threshold), kc.scale)
