"""A fold's labelled images: the train rows (plus a teacher's pseudo-labelled test rows or distillation
targets), the validation rows, their targets per head, and the class weights of the main head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from pipeline.competition.images import ImageDataset, build_transform, decode_size, loader_workers, resolve_cache
from pipeline.competition.tables import image_paths
from pipeline.store.io import log
from pipeline.tasks import HEAD_KINDS
from pipeline.training import teachers
from pipeline.training.losses import class_weight_tensor, head_targets
from pipeline.training.models import Head

if TYPE_CHECKING:
    from pipeline.config.schema import Config


@dataclass
class FoldData:
    train: ImageDataset
    valid: ImageDataset
    y_valid: np.ndarray  # the main head's validation targets, what the metric scores
    class_weights: torch.Tensor | None


def fold_datasets(cfg: Config, heads: list[Head], train_df: pd.DataFrame, tr_idx, va_idx, fold, folds_hash: str,
                  device: torch.device, local_world: int, cache_images: bool | None = None) -> FoldData:
    """``cache_images`` overrides data.cache's choice (True/False), as lr_find does for its short sweep."""
    dcfg, tcfg = cfg.data, cfg.train
    ys = head_targets(heads, train_df)
    paths = image_paths(cfg, train_df[cfg.competition.id].to_numpy(), "train")
    tr_paths, tr_y = [paths[i] for i in tr_idx], {k: v[tr_idx] for k, v in ys.items()}
    if teachers.active(cfg):  # pseudo-labelled test rows and/or distillation targets
        tr_paths, tr_y = teachers.extend(cfg, heads, fold, folds_hash, train_df, tr_idx, tr_paths, tr_y, device)
    va_paths = [paths[i] for i in va_idx]
    workers = loader_workers(dcfg, device)
    cache, why = resolve_cache(dcfg if cache_images is None else {**dcfg, "cache": cache_images},
                               tr_paths + va_paths, local_world, workers)
    log(f"[train] {why}")
    train = ImageDataset(tr_paths, dcfg.in_chans, build_transform(dcfg, tcfg.augment, seed=cfg.seed), tr_y,
                         cache, decode_size(dcfg, tcfg.augment))
    valid = ImageDataset(va_paths, dcfg.in_chans, build_transform(dcfg), {k: v[va_idx] for k, v in ys.items()},
                         cache, decode_size(dcfg))
    if cache and workers > 0:
        for ds in (train, valid):
            ds.preload(workers)
    main, kind = heads[0], HEAD_KINDS[heads[0].kind]  # (a head without classes refuses class_weights in the schema)
    cw = class_weight_tensor(tcfg, ys[main.name][tr_idx].astype(int) if kind.classes else None,
                             kind.n_weights(main.out))
    return FoldData(train, valid, ys[heads[0].name][va_idx], cw)
