"""Fold models as ``train`` leaves them, and the one staleness rule every reader applies to them.

A fold's model is current for a config when its ``meta.json`` and ``best.pt`` carry the config's train key:
a hash of what changes what the model learns (the competition, data and model sections, the train section
less its run-only keys, the seed, the folds file, ``train.csv`` and the content of every train image, and
the teacher of a pseudo-label or distillation round). ``train --check`` answers with this rule; features
and the other readers refuse fold models that do not pass it, or that were trained by different configs,
instead of averaging them.

Image content is fingerprinted by ``io.files_fingerprint``: each image is read and hashed once and then
recognised by its size and modification time (one ``stat`` per image on later runs), the hashes kept in
``<workdir>/.cache/image-hashes.json``.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.competition.images import data_key
from pipeline.competition.tables import image_paths, table_path
from pipeline.errors import InputError, UnsafeCheckpoint
from pipeline.store.io import config_hash, file_hash, files_fingerprint, read_json, read_parquet_meta
from pipeline.store.paths import under
from pipeline.training import teachers
from pipeline.training.checkpoint import Checkpoint

# keys that do not change what a fold's model is (so changing them does not retrain)
RUN_ONLY = ("folds", "full", "device")


def stage_key(cfg: dict, folds_hash: str, train_hash: str, images_hash: str | None = None) -> str:
    tcfg = {k: v for k, v in cfg["train"].items() if k not in RUN_ONLY}
    if not tcfg["ema"]:  # (a key added later leaves models trained without EMA up to date)
        tcfg.pop("ema_warmup")
    if tcfg.get("layer_decay") is None:  # (the same for models trained before layer_decay existed)
        tcfg.pop("layer_decay", None)
    parts = [cfg["competition"], data_key(cfg["data"]), cfg["model"], tcfg, cfg["seed"], folds_hash, train_hash]
    return config_hash(parts + ([images_hash] if images_hash else []))


def images_hash(cfg: dict, ids) -> str:
    return files_fingerprint(image_paths(cfg, ids), under(cfg, ".cache/image-hashes.json"))


def train_key(cfg: dict, train_df, folds_hash: str) -> str:
    """The key a fold model of this config, these folds, this train table and these images carries."""
    ids = train_df[cfg["competition"]["id"]]
    key = stage_key(cfg, folds_hash, file_hash(table_path(cfg, "train")), images_hash(cfg, ids))
    if teachers.active(cfg):  # a changed teacher retrains the student
        key = config_hash([key, teachers.teacher_key(cfg)])
    return key


def fold_is_current(out: Path, key: str) -> bool:
    """A fold is up to date when its meta.json AND every artifact it vouches for carry this stage key
    (best.pt, best_valid.parquet): files of one config are never taken for another's."""
    meta, best, valid = out / "meta.json", out / "best.pt", out / "best_valid.parquet"
    try:
        if not meta.exists() or not best.exists() or read_json(meta).get("stage_key") != key:
            return False
        if Checkpoint.read(best, mmap=True).stage_key != key:
            return False
        return not valid.exists() or read_parquet_meta(valid).get("stage_key") == key
    except UnsafeCheckpoint:
        raise  # a planted file is named, never taken for a stale one and trained over
    except (OSError, ValueError, RuntimeError):  # (InputError too: not a checkpoint)
        return False


def require_current(mdir: Path, folds, key: str) -> None:
    """Refuse fold models that this config would retrain (another backbone, lr, folds file, train.csv,
    images or teacher), naming the first such fold."""
    for k in folds:
        out = mdir / f"fold{k}"
        if not fold_is_current(out, key):
            raise InputError(f"{out}: the fold model is out of date for this config (it was trained with another "
                             "config, folds file, train.csv, images or teacher); run `make train` (same config and "
                             "overrides) first; features never mix models of different configs")


def require_one_config(keys: dict) -> None:
    """Refuse a set of fold checkpoints that came from different configs (``{fold: stage_key}``), for readers
    that have no train data to recompute the key (the Predictor, a Kaggle bundle)."""
    distinct = sorted({str(v) for v in keys.values()})
    if len(distinct) > 1:
        by = {v: [k for k, kv in keys.items() if str(kv) == v] for v in distinct}
        which = "; ".join(f"{v}: {by[v]}" for v in distinct)
        raise InputError(f"the fold models come from {len(distinct)} different configs ({which}); "
                         "retrain them together (`make train`) instead of averaging models of different configs")
