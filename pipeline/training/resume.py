"""What a fold's ``last.pt`` holds, written after every epoch and read back to resume a killed run.

It carries the model, optimizer, scheduler, AMP scaler, EMA and SWA weights, the loop's state (epoch,
best score, log) and every RNG, so a resumed run ends with the same weights as an uninterrupted one.
Everything in it is a tensor or a plain value (numpy's RNG keys are kept as a tensor), so it loads with
``weights_only=True`` like every other checkpoint.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pipeline.store.io import atomic_path, load_checkpoint, log


def _numpy_rng_state() -> tuple:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached


def _numpy_rng_from(state) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached


def save(trainer, path: Path) -> None:
    t = trainer
    ckpt = {"key": t.key, "state": t.state, "model": t.model.state_dict(), "opt": t.opt.state_dict(),
            "sched": t.sched.state_dict(), "scaler": t.scaler.state_dict(),
            "ema": t.ema.state_dict() if t.ema else None, "ema_updates": t.ema.updates if t.ema else 0,
            "swa": t.swa.state_dict() if t.swa is not None else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate()}}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def restore(trainer, path: Path) -> bool:
    """Load ``path`` into ``trainer``; False (start over) when there is none, when it belongs to another
    config, or when the best weights it points at are gone: a fold without its weights is not trained."""
    t = trainer
    if not path.exists():
        return False
    ckpt = load_checkpoint(path)
    if ckpt.get("key") != t.key:
        log(f"[train] fold {t.fold}: {path} belongs to another config; starting over")
        return False
    best = path.parent / "best.pt"
    if ckpt["state"].get("best") is not None and not best.exists():
        log(f"[train] fold {t.fold}: {best} (epoch {ckpt['state']['best_epoch']}'s weights) is missing; "
            "training this fold again from the start")
        return False
    t.model.load_state_dict(ckpt["model"])
    t.opt.load_state_dict(ckpt["opt"])
    t.sched.load_state_dict(ckpt["sched"])
    t.scaler.load_state_dict(ckpt["scaler"])
    if t.ema is not None and ckpt["ema"] is not None:
        t.ema.load_state_dict(ckpt["ema"])
        t.ema.updates = ckpt["ema_updates"]
    if ckpt.get("swa") is not None:
        t.swa = t._new_swa()
        t.swa.load_state_dict(ckpt["swa"])
    t.state = ckpt["state"]
    torch.set_rng_state(ckpt["rng"]["torch"])
    np.random.set_state(_numpy_rng_from(ckpt["rng"]["numpy"]))
    random.setstate(ckpt["rng"]["python"])
    log(f"[train] fold {t.fold}: resuming from {path} at epoch {t.state['epoch']}")
    return True
