"""``make lr-find``: sweep the learning rate exponentially over fold 0's training rows (one short run
of the fold trainer), plot loss vs lr (PNG) and suggest the lr of steepest descent."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.competition.images import seed_everything
from pipeline.competition.tables import fold_of, load_folds, load_train
from pipeline.config.train import Train
from pipeline.store import plots
from pipeline.store.io import log
from pipeline.store.paths import models_dir
from pipeline.training.models import heads_for
from pipeline.training.trainer import FoldTrainer, to_device

if TYPE_CHECKING:
    from pipeline.config.schema import Config


def run(cfg: Config, force: bool = False) -> Path:
    """``make lr-find``: sweep the lr exponentially over fold 0's training rows, plot loss vs lr (PNG),
    and suggest the lr of steepest descent of the smoothed loss."""
    lcfg = cfg.lr_find
    train_df = load_train(cfg)
    folds_df, folds_hash = load_folds(cfg)
    fold = fold_of(cfg, train_df, folds_df)
    heads = heads_for(cfg, train_df)
    # the sweep's own loop: the config's training with a constant lr (the sweep sets it) and no averaging;
    # it reads a few hundred batches at most, so decoding every image up front (data.cache=auto) would not pay
    loop = Train(**{**dict(cfg.train), "scheduler": "none", "ema": False, "swa": False})
    out = models_dir(cfg)
    trainer = FoldTrainer(cfg, heads, train_df, np.flatnonzero(fold != 0), np.array([], dtype=int), 0,
                          out / "lr_find", "lr-find", folds_hash, train=loop,
                          cache_images=cfg.data.cache is True)
    lrs = np.geomspace(lcfg.start, lcfg.end, lcfg.steps)
    mults = [g["lr"] / cfg.train.lr if cfg.train.lr else 1.0 for g in trainer.opt.param_groups]
    trainer.model.train()
    seed_everything(cfg.seed)
    losses, smooth, best, avg = [], [], float("inf"), 0.0
    batches = iter(())
    from tqdm.auto import tqdm

    for i, lr in enumerate(tqdm(lrs, desc="lr-find", leave=False)):
        try:
            x, y, _ = next(batches)
        except StopIteration:
            batches = iter(trainer.loader(trainer.train_ds, shuffle=True, epoch=i))
            x, y, _ = next(batches)
        for g, m in zip(trainer.opt.param_groups, mults):
            g["lr"] = lr * m
        loss = trainer.criterion(trainer.net(x.to(trainer.device)), to_device(y, trainer.device))
        trainer.opt.zero_grad(set_to_none=True)
        loss.backward()
        trainer.opt.step()
        value = float(loss.detach())
        avg = lcfg.smoothing * avg + (1 - lcfg.smoothing) * value
        sm = avg / (1 - lcfg.smoothing ** (i + 1))
        losses.append(value)
        smooth.append(sm)
        best = min(best, sm)
        if not math.isfinite(sm) or sm > lcfg.diverge * best:
            break
    n = len(smooth)
    lr_used, sm = lrs[:n], np.array(smooth)
    upto = int(np.argmin(sm)) + 1
    grad = np.gradient(sm[:upto], np.log10(lr_used[:upto])) if upto > 2 else np.zeros(upto)
    suggestion = float(lr_used[int(np.argmin(grad))]) if upto > 2 else float(lr_used[0])
    df = pd.DataFrame({"lr": lr_used, "loss": losses, "smoothed": smooth})
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "lr_find.csv", index=False)
    top = min(max(smooth) * 1.1, best * lcfg.diverge * 1.1)
    fig = plots.lr_finder(lr_used, losses, smooth, suggestion, top, f"{cfg.name}: lr finder (fold 0 rows)")
    plots.save_figure(out / "lr_find.png", fig)
    log(f"[lr-find] {n} steps from {lrs[0]:.1e}; steepest descent at lr {suggestion:.2e} "
        f"(minimum smoothed loss at {lr_used[upto - 1]:.2e}); plot {out / 'lr_find.png'}")
    return out / "lr_find.png"
