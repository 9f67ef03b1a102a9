"""The train key: what a fold model learned from, as one hash. A fold model is current for a config when
it carries the config's train key (``FoldModels.is_current``).

It covers what changes what the model learns: the competition, data and model sections, the train section
less its run-only keys, the seed, the folds file, ``train.csv`` and the content of every train image, and
the teacher of a pseudo-label or distillation round. Image content is fingerprinted by
``io.files_fingerprint``: each image is read and hashed once and then recognised by its size and
modification time (one ``stat`` per image on later runs), the hashes kept in
``<workdir>/.cache/image-hashes.json``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.competition.images import data_key
from pipeline.competition.tables import competition_key, image_paths, table_path
from pipeline.store.io import config_hash, file_hash, files_fingerprint
from pipeline.store.paths import under
from pipeline.training import teachers

if TYPE_CHECKING:
    from pipeline.config.schema import Config

# keys that do not change what a fold's model is (so changing them does not retrain)
RUN_ONLY = ("folds", "full", "device")


def stage_key(cfg: Config, folds_hash: str, train_hash: str, images_hash: str | None = None) -> str:
    tcfg = {k: v for k, v in dict(cfg.train).items() if k not in RUN_ONLY}
    if not tcfg["ema"]:  # (a key added later leaves models trained without EMA up to date)
        tcfg.pop("ema_warmup")
    if tcfg["loss"] != "asl":  # (the asymmetric loss's options, added later, count only for it)
        tcfg = {k: v for k, v in tcfg.items() if not k.startswith("asl_")}
    if not tcfg.get("scheduler_args"):  # (nor before scheduler_args)
        tcfg.pop("scheduler_args", None)
    if tcfg.get("layer_decay") is None:  # (the same for models trained before layer_decay existed)
        tcfg.pop("layer_decay", None)
    model = {k: v for k, v in dict(cfg.model).items() if not (k == "pretrained" and v is None)}  # (the same)
    if model.get("head", "linear") == "linear":  # (and for models from before the margin heads)
        model = {k: v for k, v in model.items() if not k.startswith("head")}
    parts = [competition_key(cfg.competition), data_key(cfg.data), model, tcfg, cfg.seed, folds_hash,
             train_hash]
    return config_hash(parts + ([images_hash] if images_hash else []))


def images_hash(cfg: Config, ids, split: str = "train") -> str:
    return files_fingerprint(image_paths(cfg, ids, split), under(cfg, ".cache/image-hashes.json"))


def train_key(cfg: Config, train_df, folds_hash: str) -> str:
    """The key a fold model of this config, these folds, this train table and these images carries."""
    ids = train_df[cfg.competition.id]
    key = stage_key(cfg, folds_hash, file_hash(table_path(cfg, "train")), images_hash(cfg, ids))
    if teachers.active(cfg):  # a changed teacher retrains the student
        key = config_hash([key, teachers.teacher_key(cfg)])
    return key
