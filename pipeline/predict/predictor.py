"""Inference API: predict new images with an experiment's fold models, offline.

    from pipeline.predict.predictor import Predictor
    pred = Predictor.from_experiment("models/demo-resnet")          # every fold's best.pt
    probs = pred.predict(["img1.png", "img2.png"], tta="hflip")["target"]   # mean over folds and views

Needs only the checkpoints (they carry the backbone name, heads and image settings), so it runs in
a Kaggle notebook with no internet and no config file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.competition.images import build_transform, decode_size, read_image, resolve_cache
from pipeline.errors import InputError
from pipeline.predict.tta import predict_views, tta_views
from pipeline.training.checkpoint import load_model
from pipeline.training.fold_models import FoldModels, require_one_config
from pipeline.training.models import pick_device


class _Images(Dataset):
    def __init__(self, items, in_chans: int, transform, size: int | None = None):
        self.items, self.in_chans, self.transform, self.size = list(items), in_chans, transform, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        arr = item if isinstance(item, np.ndarray) else read_image(item, self.in_chans, self.size)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return self.transform(image=arr)["image"], {}, i


class Predictor:
    def __init__(self, checkpoints: list[str | Path], device: str = "auto"):
        if not checkpoints:
            raise InputError("Predictor: no checkpoints given.")
        self.device = pick_device(device)
        loaded = [load_model(p, str(self.device)) for p in checkpoints]
        # never a mean over models of different configs (a resnet10t fold beside a resnet18 one)
        require_one_config({str(p): ck.stage_key for p, (_, ck) in zip(checkpoints, loaded)})
        self.models = [m for m, _ in loaded]
        self.data_cfg = loaded[0][1].data_cfg
        self.heads = self.models[0].head_specs

    @classmethod
    def from_experiment(cls, models_dir: str | Path, folds=None, use_full: bool | str = False, device: str = "auto"):
        """The fold models' mean; ``use_full``: True adds the all-data model (``foldfull``), "only" uses it alone."""
        fm = FoldModels(models_dir)
        trained = sorted(int(p.parent.name[4:]) for p in fm.folder.glob("fold[0-9]*/best.pt"))
        _, test_models = fm.for_test([k for k in trained if folds is None or k in folds], use_full, strict=False)
        paths = [fm.checkpoint(k) for k in test_models]
        d = fm.folder
        if not paths:
            raise InputError(f"{d}: no fold checkpoints (fold*/best.pt); run `make train` or copy the models folder.")
        return cls(paths, device)

    @torch.no_grad()
    def predict(self, images, tta: str = "none", scales=None, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Activated outputs per head (probabilities / values), averaged over fold models and TTA views."""
        items, c = list(images), self.data_cfg["in_chans"]
        files = [it for it in items if not isinstance(it, np.ndarray)]
        if len(self.models) > 1 and files and resolve_cache({"cache": "auto", "in_chans": c}, files)[0]:
            items = [it if isinstance(it, np.ndarray) else read_image(it, c, decode_size(self.data_cfg))
                     for it in items]  # once, not per model
        ds = _Images(items, c, build_transform(self.data_cfg), decode_size(self.data_cfg))
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
        views = tta_views(tta, scales)
        outs = [predict_views(m, self.heads, loader, views, self.device) for m in self.models]
        result = {}
        for h in self.heads:
            arr = np.mean([o[h.name].mean(0) for o in outs], axis=0)  # (N, D)
            result[h.name] = arr[:, 0] if arr.shape[1] == 1 else arr
        return result
