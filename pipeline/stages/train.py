"""``make train``: one model per fold (and optionally one on all rows) from the folds file.

Writes ``models/<experiment>/fold<k>/`` with ``best.pt`` (the weights that were validated best; the
EMA/SWA weights when those are on), ``last.pt`` (everything needed to resume after a kill -9),
``log.csv`` (one row per epoch) and ``best_valid.parquet`` (best-epoch validation predictions), plus
``models/<experiment>/summary.json`` and ``curves.png`` (mean ± std over folds). The loop itself is
``pipeline.training.trainer.FoldTrainer``; this module decides which folds to (re)train and summarises them.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.competition.tables import fold_matrix, held_out, load_folds, load_train, truth
from pipeline.errors import InputError
from pipeline.metrics import get_metric
from pipeline.store import leaderboard, plots
from pipeline.store.artifacts import stage_lock
from pipeline.store.io import log, provenance, read_json, write_json, write_resolved_config
from pipeline.store.paths import models_dir, valid_prediction
from pipeline.training import teachers
from pipeline.training.build import init_leak
from pipeline.training.distributed import Dist
from pipeline.training.fold_models import FoldModels
from pipeline.training.models import heads_for
from pipeline.training.train_key import train_key
from pipeline.training.trainer import FoldTrainer

if TYPE_CHECKING:
    from pipeline.config.schema import Config


def _plan(cfg: Config):
    """What a run of this config trains: the table, folds, heads, the stage key and the folds to do."""
    train_df = load_train(cfg)
    folds_df, folds_hash = load_folds(cfg)
    fold = fold_matrix(cfg, train_df, folds_df)  # (rows, repeats): model numbers unique over repeats
    heads = heads_for(cfg, train_df)
    teachers.check_heads(cfg, heads)
    key = train_key(cfg, train_df, folds_hash)
    if teachers.active(cfg):
        log(f"[train] {cfg.name}: {teachers.describe(cfg)}")
    n_models = int(fold.max()) + 1
    chosen = cfg.train.folds
    todo: list = list(range(n_models)) if chosen is None else [int(k) for k in (chosen if isinstance(chosen, list) else [chosen])]
    bad = [k for k in todo if not 0 <= k < n_models]
    if bad:
        raise InputError(f"train.folds names fold(s) {bad}, but the folds file has folds 0..{n_models - 1}"
                         + (f" ({fold.shape[1]} repeats)." if fold.shape[1] > 1 else "."))
    if cfg.train.full:
        todo.append("full")
    return train_df, fold, folds_hash, heads, key, todo


def up_to_date(cfg: Config) -> bool:
    """Every fold this config names is trained with this config, folds and data (``train --check``: lets
    Make skip starting one process per fold just to hear that)."""
    *_, key, todo = _plan(cfg)
    return all(FoldModels(models_dir(cfg)).is_current(k, key) for k in todo)


def run(cfg: Config, force: bool = False, on_epoch=()) -> dict:
    started = time.time()
    train_df, fold, folds_hash, heads, key, todo = _plan(cfg)
    # carried by every fold's meta.json, so what is built on them is marked too
    leak = teachers.leak_note(cfg) or init_leak(cfg, todo, folds_hash)
    exp = models_dir(cfg)
    exp.mkdir(parents=True, exist_ok=True)
    trained = []
    for k in todo:
        out = exp / f"fold{k}"
        meta_path = out / "meta.json"
        # under torchrun every rank trains the same fold together: a lock held by one would deadlock
        with stage_lock(out) if not Dist().enabled else contextlib.nullcontext():
            if not force and FoldModels(exp).is_current(k, key):
                log(f"[train] fold {k} up to date: {out}")
                continue
            if meta_path.exists():  # from here on this fold's files change: it is not up to date until the end
                meta_path.unlink()
            if force and (out / "last.pt").exists():
                (out / "last.pt").unlink()
            va = np.flatnonzero(held_out(fold, k))
            tr = np.setdiff1d(np.arange(len(fold)), va)
            trainer = FoldTrainer(cfg, heads, train_df, tr, va, k, out, key, folds_hash, on_epoch=on_epoch)
            log(f"[train] {cfg.name} fold {k}: {len(tr)} train rows, {len(va)} valid rows, device {trainer.device}"
                + (f", DDP world size {trainer.dist.world}" if trainer.dist.enabled else ""))
            result = trainer.fit()
            if not trainer.dist.main:
                trainer.dist.barrier()
                continue
            write_resolved_config(out / "config.yaml", cfg)
            write_json(meta_path, provenance(cfg, "train", key, folds_hash=folds_hash, result=result, leak=leak))
        trainer.dist.barrier()
        del trainer  # its datasets (and any image cache) go before the next fold's are built
        trained.append(k)
    if trained:  # the experiment's config is the one its latest trained weights came from (a failed run keeps it)
        write_resolved_config(exp / "config.yaml", cfg)
    if not Dist().main:
        return {}
    previous = read_json(exp / "summary.json") if (exp / "summary.json").exists() else {}
    summary = summarize(cfg, exp, key, folds_hash)
    # record when folds were trained here, or when this run completes a set trained elsewhere (make -j train)
    changed = previous.get("stage_key") != key or previous.get("summary", {}).get("folds") != summary.get("folds")
    if summary and (trained or changed):
        names = trained or [n.removeprefix("fold") for n in summary["folds"]]
        epochs = pd.concat([pd.read_csv(exp / f"fold{k}" / "log.csv") for k in names
                            if (exp / f"fold{k}" / "log.csv").exists()]).to_dict("records")
        leaderboard.record(cfg, "train", started, cv=summary.get("oof_score", summary["cv_mean"]),
                           folds=summary["folds"], artifacts=[str(exp / f"fold{k}" / "best.pt") for k in names],
                           epochs=epochs, note="; ".join(filter(None, [f"trained folds {names}",
                                                                       leak])))
    return summary


def summarize(cfg: Config, exp: Path, key: str, folds_hash: str) -> dict:
    """CV over the folds trained so far: mean ± std of per-fold scores and the OOF score."""
    metric = get_metric(cfg.competition.metric)
    logs, scores, oof = [], {}, []
    for d in sorted(exp.glob("fold[0-9]*")):
        meta = d / "meta.json"
        if not meta.exists() or read_json(meta).get("stage_key") != key:
            continue
        scores[d.name] = read_json(meta)["result"]["best"]
        if (d / "log.csv").exists():
            logs.append(pd.read_csv(d / "log.csv"))
        if (d / "best_valid.parquet").exists():
            oof.append(pd.read_parquet(d / "best_valid.parquet"))
    if not scores:
        return {}
    vals = np.array([v for v in scores.values() if v is not None], dtype=float)
    summary = {"experiment": cfg.name, "metric": metric.name, "folds": scores,
               "cv_mean": float(vals.mean()), "cv_std": float(vals.std())}
    if oof:
        train_df = load_train(cfg, check_images=False)
        id_col = cfg.competition.id
        o = pd.concat(oof).merge(train_df[[id_col]].assign(_row=np.arange(len(train_df))), on=id_col)
        head = heads_for(cfg, train_df)[0].name
        pred = valid_prediction(o, head)
        summary["oof_score"] = metric(truth(cfg, train_df)[o["_row"].to_numpy()], pred)
        summary["oof_rows"] = int(len(o))
    write_json(exp / "summary.json", provenance(cfg, "train", key, folds_hash=folds_hash, summary=summary))
    if logs:
        plots.save_figure(exp / "curves.png", plots.curves(pd.concat(logs), metric.name, cfg.name))
    log(f"[train] {cfg.name}: CV {metric.name} {summary['cv_mean']:.4f} ± {summary['cv_std']:.4f} over "
        f"{len(vals)} fold(s)" + (f", OOF {summary['oof_score']:.4f}" if "oof_score" in summary else ""))
    return summary
