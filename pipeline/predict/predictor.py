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

from pipeline.competition.images import decode_size, read_image, resolve_cache
from pipeline.errors import InputError
from pipeline.predict.model_run import ModelRun
from pipeline.predict.tta import tta_views
from pipeline.training.fold_models import FoldModels, require_one_config
from pipeline.training.models import pick_device


class Predictor:
    def __init__(self, checkpoints: list[str | Path], device: str = "auto"):
        if not checkpoints:
            raise InputError("Predictor: no checkpoints given.")
        self.device = pick_device(device)
        self.runs = [ModelRun(p, self.device) for p in checkpoints]
        # never a mean over models of different configs (a resnet10t fold beside a resnet18 one)
        require_one_config({str(p): run.stage_key for p, run in zip(checkpoints, self.runs)})
        self.models = [run.model for run in self.runs]
        self.data_cfg = self.runs[0].data_cfg
        self.heads = self.runs[0].heads

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
        if len(self.runs) > 1 and files and resolve_cache({"cache": "auto", "in_chans": c}, files)[0]:
            items = [it if isinstance(it, np.ndarray) else read_image(it, c, decode_size(self.data_cfg))
                     for it in items]  # once, not per model
        views = tta_views(tta, scales)
        outs = [run.predict(items, views, batch_size) for run in self.runs]
        result = {}
        for h in self.heads:
            arr = np.mean([o[h.name].mean(0) for o in outs], axis=0)  # (N, D)
            result[h.name] = arr[:, 0] if arr.shape[1] == 1 else arr
        return result
