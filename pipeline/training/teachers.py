"""Extra training inputs from a teacher: pseudo-labelled test rows and distillation soft targets.

The leakage rule, enforced here: nothing learned from fold k's validation rows may reach fold k's
model. So fold k's pseudo-labels are the test predictions of the teacher's own fold-k model
(``features/<teacher>/test_folds.parquet``), never the fold mean; and fold k's soft targets are the
teacher's fold-k model run on fold k's training rows. Those are in-sample predictions (the teacher
trained on those rows, so they are more confident than OOF ones: that is the price of no leak).
The teacher's OOF predictions would be better calibrated but each came from a model that trained on
fold k's validation rows; they are used only with ``train.distill.allow_leak: true``.
A teacher built with another folds file is refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError, InputError
from pipeline.store.artifacts import inherited_leak, require_complete
from pipeline.store.io import read_json
from pipeline.store.paths import features_dir, head_prediction, main_head, models_dir
from pipeline.tasks import head_kind, task_of
from pipeline.training.fold_models import FoldModels

if TYPE_CHECKING:
    from pipeline.config.schema import Config


def active(cfg: Config) -> bool:
    t = cfg.train
    return bool(t.pseudo.source or t.distill.teacher)


def check_heads(cfg: Config, heads) -> None:
    if active(cfg) and (len(heads) != 1 or not head_kind(heads[0].kind).soft_targets):
        raise ConfigError("train.pseudo / train.distill need one multiclass or multilabel target head (class or "
                          "label probabilities; no auxiliary heads); "
                          f"this experiment has {[(h.name, h.kind) for h in heads]}.")


def _same_folds(meta: dict, folds_hash: str, where) -> None:
    if meta.get("folds_hash") != folds_hash:
        raise InputError(f"{where} was built with folds file hash {meta.get('folds_hash')}, not the current "
                         f"{folds_hash}: its fold-k model may have trained on this fold k's validation rows. "
                         "Rebuild the teacher with the current folds file.")


def teacher_key(cfg: Config) -> list:
    """What the student's weights depend on besides its own config: the teachers' stage keys."""
    t, keys = cfg.train, []
    if t.pseudo.source:
        meta = features_dir(cfg, t.pseudo.source) / "meta.json"
        keys.append(read_json(meta).get("stage_key") if meta.exists() else None)
    if t.distill.teacher:
        keys.append(sorted(FoldModels(models_dir(cfg, t.distill.teacher)).stage_keys().items()))
        if t.distill.allow_leak:
            meta = features_dir(cfg, t.distill.teacher) / "meta.json"
            keys.append(read_json(meta).get("stage_key") if meta.exists() else None)
    return keys


def pseudo_labels(cfg: Config, fold, folds_hash: str, id_col: str) -> tuple[np.ndarray, np.ndarray]:
    """(test ids, class probabilities) that fold ``fold`` may train on: the teacher's fold-``fold``
    test predictions whose top probability reaches the threshold."""
    pc = cfg.train.pseudo
    src = features_dir(cfg, pc.source)
    meta = require_complete(src, ["test_folds.parquet"], f"per-fold test predictions of '{pc.source}'",
                            f"run `make features` for experiment '{pc.source}' first")
    _same_folds(meta, folds_hash, src)
    # the all-data student learns from test.parquet, so every model behind it must still be the one used
    made_from = meta.get("model_keys") or {}
    for k in (made_from if str(fold) == "full" else [str(fold)] if str(fold) in made_from else []):
        now = FoldModels(models_dir(cfg, pc.source)).meta(k).get("stage_key", made_from[k])
        if now != made_from[k]:
            raise InputError(f"{src} holds the test predictions of an older fold-{k} model of '{pc.source}'; "
                             f"that model has been retrained since. Run `make features` for '{pc.source}' first.")
    df = pd.read_parquet(src / ("test.parquet" if str(fold) == "full" else "test_folds.parquet"))
    rows = df if str(fold) == "full" else df[df["fold"] == str(fold)]  # the all-data model has no validation rows
    if rows.empty:
        raise InputError(f"{src}/test_folds.parquet has no test predictions of fold {fold}'s model "
                         f"(folds: {sorted(df['fold'].unique())}).")
    probs = np.atleast_2d(head_prediction(rows, pc.source, main_head(cfg), "mean"))
    # confident rows: the top class reaches the threshold; for a label set, every label's yes or no does
    sure = np.maximum(probs, 1 - probs).min(axis=1) if task_of(cfg).label_sets else probs.max(axis=1)
    keep = sure >= pc.threshold
    return rows[id_col].to_numpy()[keep], probs[keep]


def distill_targets(cfg: Config, fold, folds_hash: str, train_df: pd.DataFrame, rows: np.ndarray, device) -> np.ndarray:
    """Teacher class probabilities for ``rows`` of train.csv, from a teacher that never saw fold
    ``fold``'s validation rows (or its OOF predictions with ``allow_leak``)."""
    dc = cfg.train.distill
    id_col = cfg.competition.id
    ids = train_df[id_col].to_numpy()[rows]
    if dc.allow_leak:
        src = features_dir(cfg, dc.teacher)
        meta = require_complete(src, ["oof.parquet"], f"OOF predictions of '{dc.teacher}'",
                                f"run `make features` for experiment '{dc.teacher}' first")
        _same_folds(meta, folds_hash, src)
        oof = pd.read_parquet(src / "oof.parquet").set_index(id_col).loc[ids].reset_index()
        return np.atleast_2d(head_prediction(oof, dc.teacher, main_head(cfg), "mean"))
    path = models_dir(cfg, dc.teacher) / f"fold{fold}" / "best.pt"
    meta_path = path.parent / "meta.json"
    if not path.exists() or not meta_path.exists():
        raise InputError(f"{path.parent}: no trained teacher model for fold {fold}; run `make train` for "
                         f"experiment '{dc.teacher}' (with the same folds) first.")
    _same_folds(read_json(meta_path), folds_hash, path.parent)
    return _predict(path, cfg, ids, device, fold)


def _predict(checkpoint: Path, cfg: Config, ids, device, fold) -> np.ndarray:
    """The teacher model's class probabilities (plain view) for the given train ids; the checkpoint must
    say it is fold ``fold``'s model (a models folder whose fold folders were swapped is refused)."""
    from pipeline.competition.tables import image_paths
    from pipeline.predict.model_run import ModelRun

    run = ModelRun(checkpoint, device, fold=fold)  # the teacher's own image size and normalisation
    return run.predict(image_paths(cfg, ids, "train"), batch_size=256)[run.heads[0].name][0]


def leak_note(cfg: Config) -> str | None:
    """Why this experiment's fold models carry their own validation labels (a LEAKY mark that its train and
    features rows, and everything built on them, carry), or None: its own ``allow_leak``, or a teacher that
    is leaky itself (a pseudo-label source or distillation teacher built on leaked labels)."""
    dc, pc = cfg.train.distill, cfg.train.pseudo
    if dc.teacher and dc.allow_leak:
        return (f"LEAKY: distilled from {dc.teacher}'s OOF predictions (allow_leak), which carry each fold's "
                "validation labels into its model; its CV is optimistic")
    teachers = {}
    if pc.source and (features_dir(cfg, pc.source) / "meta.json").exists():
        teachers[pc.source] = read_json(features_dir(cfg, pc.source) / "meta.json")
    if dc.teacher:
        teacher = FoldModels(models_dir(cfg, dc.teacher))
        metas = [teacher.meta(name.removeprefix("fold")) for name in teacher.stage_keys()]
        teachers[dc.teacher] = next((m for m in metas if m.get("leak")), {})
    return inherited_leak(teachers)


def describe(cfg: Config) -> str:
    t = cfg.train
    parts = []
    if t.pseudo.source:
        parts.append(f"pseudo-labels from {t.pseudo.source} (p >= {t.pseudo.threshold})")
    if t.distill.teacher:
        parts.append(f"distilled from {t.distill.teacher}" + (" (LEAKY OOF)" if t.distill.allow_leak else ""))
    return "; ".join(parts)



def extend(cfg: Config, heads, fold, folds_hash: str, train_df: pd.DataFrame, rows: np.ndarray, paths: list,
           ys: dict, device) -> tuple[list, dict]:
    """A fold's training rows plus what the teachers give: pseudo-labelled test images appended (with their
    loss weight in ``__weight``) and the distillation targets of every row in ``__teacher``."""
    from pipeline.competition.tables import image_paths
    from pipeline.store.io import log

    check_heads(cfg, heads)
    head, t = heads[0], cfg.train
    y = np.asarray(ys[head.name])
    weight = np.ones(len(rows), np.float32)
    teacher = None
    if t.distill.teacher:
        teacher = distill_targets(cfg, fold, folds_hash, train_df, rows, device).astype(np.float32)
    if t.pseudo.source:
        pc = t.pseudo
        ids, probs = pseudo_labels(cfg, fold, folds_hash, cfg.competition.id)
        if probs.shape[1] != head.out:
            raise InputError(f"train.pseudo.source '{pc.source}' predicts {probs.shape[1]} classes, this "
                             f"experiment {head.out}.")
        if task_of(cfg).label_sets:  # 0/1 per label already: append the probabilities, or their yes/no
            y = np.vstack([y, probs if pc.soft else (probs >= 0.5)]).astype(np.float32)
        elif pc.soft:
            y = np.vstack([np.eye(head.out, dtype=np.float32)[y], probs.astype(np.float32)])
        else:
            y = np.concatenate([y, probs.argmax(axis=1)]).astype(np.int64)
        weight = np.concatenate([weight, np.full(len(ids), pc.weight, np.float32)])
        if teacher is not None:  # the pseudo rows' soft targets are the pseudo-labeller's own probabilities
            teacher = np.vstack([teacher, probs.astype(np.float32)])
        paths = list(paths) + image_paths(cfg, ids, "test")
        log(f"[train] fold {fold}: +{len(ids)} pseudo-labelled test rows from {pc.source}'s fold-{fold} model "
            f"(p >= {pc.threshold}, weight {pc.weight}, {'soft' if pc.soft else 'hard'} labels)")
    out = {head.name: y, "__weight": weight}
    if teacher is not None:
        out["__teacher"] = teacher
    return paths, out
