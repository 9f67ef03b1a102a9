"""One fold model loaded once, predicting image sets as it was trained to see them: the image size,
channels and normalisation its checkpoint recorded, with the TTA views asked for. The one way the features
stage, the Kaggle bundle, the ``Predictor`` and the teachers run a model on images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from pipeline.competition.images import ImageDataset, SharedImages, build_transform, decode_size
from pipeline.predict.tta import predict_views
from pipeline.store.io import log
from pipeline.training.checkpoint import load_model

PLAIN = [lambda x: x]  # the identity view: no TTA


class ModelRun:
    def __init__(self, checkpoint: str | Path, device, fold=None):
        """``fold``: the checkpoint must say it is that fold's model (a swapped models folder is refused)."""
        self.model, self.checkpoint = load_model(checkpoint, str(device))
        if fold is not None:
            self.checkpoint.require_fold(fold)
        self.device, self.heads = device, self.model.head_specs
        self.data_cfg = self.checkpoint.data_cfg
        self.transform = build_transform(self.data_cfg)

    @property
    def stage_key(self) -> str | None:
        return self.checkpoint.stage_key

    def images(self, images) -> ImageDataset:
        """``images``: a ``SharedImages`` (decoded once for every model of a set), or image paths / arrays."""
        size = decode_size(self.data_cfg)
        if isinstance(images, SharedImages):
            ds, why = images.view(self.data_cfg["in_chans"], self.transform, size)
            if why:
                log(f"[predict] {why}")
            return ds
        return ImageDataset(list(images), self.data_cfg["in_chans"], self.transform, size=size)

    def loader(self, images, batch_size: int = 64, workers: int = 0) -> DataLoader:
        return DataLoader(self.images(images), batch_size=batch_size, shuffle=False, num_workers=workers)

    def predict(self, images, views=None, batch_size: int = 64, workers: int = 0, embed: bool = False,
                desc: str | None = None) -> dict[str, np.ndarray]:
        """Activated outputs per head, ``{head: (views, rows, outputs)}`` (+ ``embedding`` with ``embed``).
        ``images`` may be a loader made by ``loader``."""
        loader = images if isinstance(images, DataLoader) else self.loader(images, batch_size, workers)
        if desc:
            from tqdm.auto import tqdm

            loader = tqdm(loader, desc=desc, leave=False)
        return predict_views(self.model, self.heads, loader, views or PLAIN, self.device, embed)
