"""``make train``: one model per fold (and optionally one on all rows) from the folds file.

Writes ``models/<experiment>/fold<k>/`` with ``best.pt`` (the weights that were validated best; the
EMA/SWA weights when those are on), ``last.pt`` (everything needed to resume after a kill -9),
``log.csv`` (one row per epoch) and ``valid.parquet`` (best-epoch validation predictions), plus
``models/<experiment>/summary.json`` and ``curves.png`` (mean ± std over folds).
Every epoch is reseeded from (seed, fold, epoch), so a resumed run ends with the same weights as an
uninterrupted one.
"""
from __future__ import annotations

import copy
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import leaderboard
from .competition import InputError, image_paths, load_train, table_path
from .config import config_hash, targets
from .folds import load_folds
from .images import ImageDataset, build_transform
from .io import (atomic_path, file_hash, log, provenance, read_json, save_figure, write_json, write_parquet,
                 write_resolved_config)
from .metrics import get_metric
from .models import Head, activate, build_model, freeze_stages, heads_for, pick_device, save_checkpoint_model

# keys that do not change what a fold's model is (so changing them does not retrain)
_RUN_ONLY = ("folds", "full", "device", "log_every")


def experiment_dir(cfg: dict) -> Path:
    return Path("models") / cfg["name"]


def stage_key(cfg: dict, folds_hash: str, train_hash: str) -> str:
    tcfg = {k: v for k, v in cfg["train"].items() if k not in _RUN_ONLY}
    data = {k: v for k, v in cfg["data"].items() if k != "num_workers"}
    return config_hash([cfg["competition"], data, cfg["model"], tcfg, cfg["seed"], folds_hash, train_hash])


# ---------------------------------------------------------------------------------------------- losses
def head_targets(heads: list[Head], df: pd.DataFrame) -> dict[str, np.ndarray]:
    out = {}
    for h in heads:
        if h.kind == "multiclass":
            y = df[h.columns[0]].to_numpy()
            bad = (y < 0) | (y >= h.out)
            if bad.any():
                raise InputError(f"target column '{h.columns[0]}' has value {y[bad][0]!r} (row id "
                                 f"{df.index[bad][0]}) outside the declared classes 0..{h.out - 1}.")
            out[h.name] = y.astype(np.int64)
        elif h.kind == "vector":
            out[h.name] = df[h.columns].to_numpy(np.float32)
        else:
            out[h.name] = df[h.columns[0]].to_numpy(np.float32)
    return out


class HeadLoss(nn.Module):
    """Per-sample loss of one head; soft (mixed) targets supported for classification."""

    def __init__(self, head: Head, kind: str, tcfg: dict, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.head, self.kind = head, kind
        self.smoothing = tcfg["label_smoothing"]
        self.gamma = tcfg["focal_gamma"]
        self.register_buffer("cw", class_weights if class_weights is not None else torch.empty(0))

    def forward(self, logits, y):
        k = self.kind
        if self.head.kind == "position":  # jigsaw: for each of n positions, which of n tiles is there
            n = int(round(math.sqrt(self.head.out)))
            return F.cross_entropy(logits.float().reshape(-1, n), y.long().reshape(-1), reduction="none").reshape(
                len(y), n).mean(-1)
        if self.head.kind == "multiclass":
            soft = y if y.ndim == 2 else F.one_hot(y, self.head.out).float()
            if self.smoothing:
                soft = soft * (1 - self.smoothing) + self.smoothing / self.head.out
            logp = logits.float().log_softmax(-1)
            w = self.cw if self.cw.numel() else None
            ce = -(soft * logp * (w if w is not None else 1)).sum(-1)
            if k == "focal":
                pt = (soft * logp.exp()).sum(-1)
                ce = (1 - pt).clamp(min=0).pow(self.gamma) * ce
            return ce
        if self.head.kind == "binary":
            z = logits.float().squeeze(-1)
            y = y.float()
            if self.smoothing:
                y = y * (1 - self.smoothing) + 0.5 * self.smoothing
            bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
            if k == "focal":
                p = torch.sigmoid(z)
                pt = p * y + (1 - p) * (1 - y)
                bce = (1 - pt).pow(self.gamma) * bce
            return bce
        z = logits.float().reshape(len(y), -1)
        y = y.float().reshape(len(y), -1)
        if k in ("mse", "rmse", "auto"):
            return ((z - y) ** 2).mean(-1)
        if k == "mae":
            return (z - y).abs().mean(-1)
        if k == "smoothl1":
            return F.smooth_l1_loss(z, y, reduction="none").mean(-1)
        raise InputError(f"train.loss '{k}' does not apply to a {self.head.kind} head.")


class Criterion(nn.Module):
    """Weighted sum over heads of the (optionally top-k) mean per-sample loss."""

    def __init__(self, heads: list[Head], tcfg: dict, main: set[str], class_weights=None):
        super().__init__()
        losses = {}
        for h in heads:
            kind = tcfg["loss"] if h.name in main else "auto"
            if kind == "auto":
                kind = {"multiclass": "ce", "binary": "bce"}.get(h.kind, "mse")
            losses[h.name] = HeadLoss(h, kind, tcfg, class_weights if h.name in main else None)
        self.losses = nn.ModuleDict(losses)
        self.weights = {h.name: h.weight for h in heads}
        self.rmse = {h.name for h in heads if h.name in main and tcfg["loss"] == "rmse"}
        self.ohem = tcfg["ohem"]

    def forward(self, out: dict, y: dict, y2: dict | None = None, lam: float = 1.0):
        total = 0.0
        for name, fn in self.losses.items():
            per = fn(out[name], y[name])
            if y2 is not None and lam < 1.0:
                per = lam * per + (1 - lam) * fn(out[name], y2[name])
            if self.ohem < 1.0:
                k = max(1, int(math.ceil(self.ohem * len(per))))
                per = per.topk(k).values
            loss = per.mean()
            if name in self.rmse:
                loss = (loss + 1e-8).sqrt()
            total = total + self.weights[name] * loss
        return total


def class_weight_tensor(tcfg: dict, y: np.ndarray | None, n_classes: int) -> torch.Tensor | None:
    cw = tcfg["class_weights"]
    if cw is None or y is None:
        return None
    if cw == "balanced":
        counts = np.bincount(y, minlength=n_classes).astype(float)
        return torch.tensor(len(y) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)
    if len(cw) != n_classes:
        raise InputError(f"train.class_weights has {len(cw)} values for {n_classes} classes.")
    return torch.tensor(cw, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ schedules
def lr_lambda(tcfg: dict, steps_per_epoch: int):
    """Multiplier of the base lr at optimizer step ``s`` (warm-up, then the chosen schedule)."""
    total = max(1, tcfg["epochs"] * steps_per_epoch)
    warm = tcfg["warmup_epochs"] * steps_per_epoch
    floor = tcfg["min_lr_ratio"]
    kind = tcfg["scheduler"]

    def f(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if kind == "cosine":
            t = (s - warm) / max(1, total - warm)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if kind == "restarts":
            cycle = max(1, tcfg["cycle_epochs"] or tcfg["epochs"]) * steps_per_epoch
            t = ((s - warm) % cycle) / cycle
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if kind == "step":
            epoch = s // steps_per_epoch
            return tcfg["gamma"] ** sum(epoch >= m for m in tcfg["milestones"])
        return 1.0

    return f


class ModelEma(nn.Module):
    """Exponential moving average of a model's weights (buffers copied); decay warms up early on."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(d).add_(m.detach(), alpha=1 - d)
            else:
                e.copy_(m)


# ---------------------------------------------------------------------------------------- utilities
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, fold, epoch: int) -> int:
    f = int(fold) if str(fold).isdigit() else {"full": -1}.get(str(fold), -2)
    return (seed * 1_000_003 + (f + 2) * 10_007 + epoch * 101) % 2**31


def mix_batch(x, y: dict, tcfg: dict, epoch: int):
    """Mixup or cutmix (chosen at random when both are on); returns x, y of the partner rows, lambda."""
    alphas = [(n, tcfg[n]) for n in ("mixup", "cutmix") if tcfg[n] > 0]
    off = tcfg["mix_off_epoch"]
    if not alphas or (off is not None and epoch >= off) or torch.rand(()) >= tcfg["mix_prob"]:
        return x, None, 1.0
    kind, alpha = alphas[int(torch.randint(len(alphas), ()))]
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.size(0))
    y2 = {k: v[perm] for k, v in y.items()}
    if kind == "mixup":
        return lam * x + (1 - lam) * x[perm], y2, lam
    h, w = x.shape[-2:]
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, y2, lam


def _kill_hook(where: str, value: int) -> None:
    """Test hook: PIPELINE_KILL_AT=epoch:N or step:N sends this process SIGKILL there."""
    spec = os.environ.get("PIPELINE_KILL_AT", "")
    if spec == f"{where}:{value}":
        os.kill(os.getpid(), signal.SIGKILL)


class Dist:
    """The torchrun environment: world size, rank, local rank (1, 0, 0 outside torchrun)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def setup(self, device: torch.device) -> torch.device:
        """Join the process group (nccl on CUDA, gloo on CPU); returns this process's device."""
        if not self.enabled:
            return device
        import torch.distributed as tdist

        if device.type == "cuda":
            device = torch.device("cuda", self.local)
            torch.cuda.set_device(device)
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
        return device

    def barrier(self):
        if self.enabled:
            import torch.distributed as tdist

            tdist.barrier()


def to_device(y: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in y.items()}


# ------------------------------------------------------------------------------------------- one fold
class FoldTrainer:
    """Trains one fold: the loop over epochs and batches, validation, checkpoints, resume."""

    def __init__(self, cfg: dict, heads: list[Head], train_df: pd.DataFrame, tr_idx, va_idx, fold, out_dir: Path,
                 key: str, folds_hash: str, datasets: tuple | None = None, metric=None):
        """``datasets`` = (train, valid, valid targets) replaces the competition's labelled images (the
        jigsaw pretext task trains through this same loop); ``metric`` replaces the competition metric."""
        self.cfg, self.tcfg, self.heads, self.fold = cfg, cfg["train"], heads, fold
        self.out_dir, self.key, self.folds_hash = out_dir, key, folds_hash
        self.metric = metric or get_metric(cfg["competition"]["metric"])
        self.dist = Dist()
        self.device = self.dist.setup(pick_device(self.tcfg["device"]))
        self.ids = train_df[cfg["competition"]["id"]].to_numpy()
        self.tr_idx, self.va_idx = np.asarray(tr_idx), np.asarray(va_idx)
        main_targets = {h.name for h in heads if h.name in targets(cfg)} or {heads[0].name}
        cw = None
        if datasets is None:
            ys = head_targets(heads, train_df)
            paths = image_paths(cfg, self.ids)
            dcfg = cfg["data"]
            self.train_ds = ImageDataset([paths[i] for i in self.tr_idx], dcfg["in_chans"],
                                         build_transform(dcfg, self.tcfg["augment"], seed=cfg["seed"]),
                                         {k: v[self.tr_idx] for k, v in ys.items()}, dcfg["cache"])
            self.valid_ds = ImageDataset([paths[i] for i in self.va_idx], dcfg["in_chans"], build_transform(dcfg),
                                         {k: v[self.va_idx] for k, v in ys.items()}, dcfg["cache"])
            self.y_valid = ys[heads[0].name][self.va_idx]
            main_head = heads[0]
            cw = class_weight_tensor(self.tcfg, ys[main_head.name][self.tr_idx] if main_head.kind == "multiclass"
                                     else None, main_head.out)
        else:
            self.train_ds, self.valid_ds, self.y_valid = datasets
        self.criterion = Criterion(heads, self.tcfg, main_targets, cw).to(self.device)
        self.steps_per_epoch = max(1, math.ceil(len(self.tr_idx) / self.tcfg["batch_size"] / self.tcfg["accumulate"]))
        self.build()

    # -- construction
    def build(self):
        cfg, tcfg = self.cfg, self.tcfg
        seed_everything(epoch_seed(cfg["seed"], self.fold, -1))
        self.model = build_model(cfg, self.heads).to(self.device)
        self.frozen = freeze_stages(self.model.backbone, cfg["model"]["freeze_stages"])
        if tcfg["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = self.model  # what the training forward pass runs (DDP-wrapped under torchrun)
        if self.dist.enabled:
            if tcfg["sync_bn"] and self.device.type == "cuda":
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            elif tcfg["sync_bn"] and self.dist.main:
                log("[train] train.sync_bn: SyncBatchNorm needs CUDA; each CPU process keeps its own BatchNorm statistics")
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        backbone = [p for p in self.model.backbone.parameters() if p.requires_grad]
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        groups = [{"params": backbone, "lr": tcfg["lr"] * tcfg["backbone_lr_mult"]}, {"params": rest, "lr": tcfg["lr"]}]
        name = tcfg["optimizer"]
        extra = tcfg["optimizer_args"] or {}
        if name == "adam":
            self.opt = torch.optim.Adam(groups, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"], **extra)
        elif name == "adamw":
            self.opt = torch.optim.AdamW(groups, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"], **extra)
        elif name == "sgd":
            self.opt = torch.optim.SGD(groups, lr=tcfg["lr"], momentum=tcfg["momentum"],
                                       weight_decay=tcfg["weight_decay"], nesterov=tcfg["momentum"] > 0, **extra)
        else:
            raise InputError(f"train.optimizer must be adam, adamw or sgd, got '{name}'.")
        if tcfg["scheduler"] == "plateau":
            self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.opt, mode="max" if self.metric.higher_is_better else "min", factor=tcfg["gamma"],
                patience=tcfg["patience"])
        elif tcfg["scheduler"] in ("cosine", "restarts", "step", "none"):
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(tcfg, self.steps_per_epoch))
        else:
            raise InputError(f"train.scheduler must be cosine, restarts, step, plateau or none, got '{tcfg['scheduler']}'.")
        self.ema = ModelEma(self.model, tcfg["ema_decay"]) if tcfg["ema"] else None
        self.swa = None
        self.amp_dtype = None
        if tcfg["amp"] and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.state = {"epoch": 0, "best": None, "best_epoch": -1, "bad_epochs": 0, "log": [], "swa_n": 0}

    # -- checkpoints
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def save_last(self):
        if not self.dist.main:
            return
        ckpt = {"key": self.key, "state": self.state, "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "ema_updates": self.ema.updates if self.ema else 0,
                "swa": self.swa.state_dict() if self.swa is not None else None,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
        with atomic_path(self.out_dir / "last.pt") as tmp:
            torch.save(ckpt, tmp)

    def try_resume(self) -> bool:
        path = self.out_dir / "last.pt"
        if not path.exists():
            return False
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if ckpt.get("key") != self.key:
            log(f"[train] fold {self.fold}: {path} belongs to another config; starting over")
            return False
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["opt"])
        self.sched.load_state_dict(ckpt["sched"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt["ema"] is not None:
            self.ema.load_state_dict(ckpt["ema"])
            self.ema.updates = ckpt["ema_updates"]
        if ckpt.get("swa") is not None:
            self.swa = self._new_swa()
            self.swa.load_state_dict(ckpt["swa"])
        self.state = ckpt["state"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        log(f"[train] fold {self.fold}: resuming from {path} at epoch {self.state['epoch']}")
        return True

    def _new_swa(self):
        from torch.optim.swa_utils import AveragedModel

        return AveragedModel(self.model)

    def save_weights(self, model: nn.Module, name: str, score, epoch, preds=None):
        if not self.dist.main:
            return
        extra = {"fold": self.fold, "epoch": epoch, "score": score, "metric": self.metric.name,
                 "stage_key": self.key, "folds_hash": self.folds_hash}
        with atomic_path(self.out_dir / name) as tmp:
            torch.save(save_checkpoint_model(model, self.cfg, extra), tmp)
        if preds is not None:
            write_parquet(self.out_dir / name.replace(".pt", "_valid.parquet"), preds,
                          {"fold": self.fold, "epoch": epoch, "stage_key": self.key})

    # -- loops
    def loader(self, ds, shuffle: bool, epoch: int = 0) -> DataLoader:
        seed = epoch_seed(self.cfg["seed"], self.fold, epoch)
        g = torch.Generator().manual_seed(seed)
        workers = self.cfg["data"]["num_workers"]
        sampler = None
        if shuffle and self.dist.enabled:  # each process trains on its own shard of the fold
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(ds, num_replicas=self.dist.world, rank=self.dist.rank, shuffle=True, seed=seed)
        return DataLoader(ds, batch_size=self.tcfg["batch_size"] if shuffle else max(self.tcfg["batch_size"], 64),
                          shuffle=shuffle and sampler is None, sampler=sampler, generator=g, num_workers=workers,
                          drop_last=False, pin_memory=self.device.type == "cuda", persistent_workers=False)

    def set_backbone_trainable(self, epoch: int):
        frozen_epochs = self.tcfg["freeze_backbone_epochs"]
        trainable = epoch >= frozen_epochs
        for n, p in self.model.backbone.named_parameters():
            top = n.split(".")[0]
            p.requires_grad_(trainable and top not in self.frozen)

    def train_epoch(self, epoch: int) -> float:
        from tqdm.auto import tqdm

        tcfg = self.tcfg
        self.model.train()
        self.set_backbone_trainable(epoch)
        seed = epoch_seed(self.cfg["seed"], self.fold, epoch)
        seed_everything(seed)
        self.train_ds.set_epoch(seed)
        loader = self.loader(self.train_ds, shuffle=True, epoch=epoch)
        total, n, t0 = 0.0, 0, time.time()
        bar = tqdm(loader, desc=f"fold {self.fold} ep {epoch + 1}/{tcfg['epochs']}", leave=False, mininterval=1,
                   dynamic_ncols=True, disable=not self.dist.main)
        accum = tcfg["accumulate"]
        self.opt.zero_grad(set_to_none=True)
        for step, (x, y, _) in enumerate(bar):
            _kill_hook("step", step + epoch * len(loader))
            x = x.to(self.device, non_blocking=True)
            y = to_device(y, self.device)
            if tcfg["multiscale"]:
                size = int(tcfg["multiscale"][int(torch.randint(len(tcfg["multiscale"]), ()))])
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            if tcfg["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            x, y2, lam = mix_batch(x, y, tcfg, epoch)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.net(x)
                loss = self.criterion(out, y, y2, lam)
            self.scaler.scale(loss / accum).backward()
            last = step + 1 == len(loader)
            if (step + 1) % accum == 0 or last:
                if tcfg["grad_clip"]:
                    self.scaler.unscale_(self.opt)
                    nn.utils.clip_grad_norm_(self.model.parameters(), tcfg["grad_clip"])
                self.scaler.step(self.opt)
                self.scaler.update()
                self.opt.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.model)
                if isinstance(self.sched, torch.optim.lr_scheduler.LambdaLR):
                    self.sched.step()
            total += float(loss.detach()) * len(x)
            n += len(x)
            best = self.state["best"]
            bar.set_postfix({"loss": f"{total / n:.4f}", f"best {self.metric.name}": "-" if best is None else f"{best:.4f}",
                             "lr": f"{self.opt.param_groups[-1]['lr']:.2e}",
                             "img/s": f"{n / max(time.time() - t0, 1e-9):.0f}"}, refresh=False)
        bar.close()
        return total / max(n, 1)

    @torch.no_grad()
    def predict(self, model: nn.Module) -> tuple[dict[str, np.ndarray], float]:
        model.eval()
        outs: dict[str, list] = {h.name: [] for h in self.heads}
        total, n = 0.0, 0
        for x, y, _ in self.loader(self.valid_ds, shuffle=False):
            x = x.to(self.device)
            if self.tcfg["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = model(x)
            total += float(self.criterion(out, to_device(y, self.device))) * len(x)
            n += len(x)
            for h in self.heads:
                outs[h.name].append(activate(h, out[h.name]).cpu().numpy())
        return {k: np.concatenate(v) for k, v in outs.items()}, total / max(n, 1)

    def preds_frame(self, preds: dict[str, np.ndarray]) -> pd.DataFrame:
        id_col = self.cfg["competition"]["id"]
        df = pd.DataFrame({id_col: self.ids[self.va_idx]})
        for name, p in preds.items():
            p = p.reshape(len(p), -1)
            for j in range(p.shape[1]):
                df[f"{name}__{j}"] = p[:, j]
        return df

    def fit(self) -> dict:
        tcfg = self.tcfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.try_resume()
        has_valid = len(self.va_idx) > 0
        epochs = tcfg["epochs"]
        swa_start = int(tcfg["swa_start"] * epochs) if tcfg["swa_start"] < 1 else int(tcfg["swa_start"])
        while self.state["epoch"] < epochs:
            epoch = self.state["epoch"]
            t0 = time.time()
            train_loss = self.train_epoch(epoch)
            if tcfg["swa"] and epoch >= swa_start:
                if self.swa is None:
                    self.swa = self._new_swa()
                self.swa.update_parameters(self.eval_model())
            row = {"fold": self.fold, "epoch": epoch + 1, "train_loss": train_loss,
                   "lr": self.opt.param_groups[-1]["lr"], "seconds": 0.0}
            improved = False
            if has_valid:
                preds, valid_loss = self.predict(self.eval_model())
                score = self.metric(self.y_valid, preds[self.heads[0].name])
                row.update(valid_loss=valid_loss, score=score)
                improved = self.metric.better(score, self.state["best"])
                if improved:
                    self.state.update(best=score, best_epoch=epoch + 1, bad_epochs=0)
                    self.save_weights(self.eval_model(), "best.pt", score, epoch + 1, self.preds_frame(preds))
                else:
                    self.state["bad_epochs"] += 1
                if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.sched.step(score)
            if tcfg["scheduler"] == "restarts" and tcfg["cycle_epochs"] and (epoch + 1) % tcfg["cycle_epochs"] == 0:
                self.save_weights(self.eval_model(), f"snapshot_e{epoch + 1}.pt", row.get("score"), epoch + 1)
            row["seconds"] = round(time.time() - t0, 2)
            self.state["log"].append(row)
            self.state["epoch"] = epoch + 1
            stop = bool(tcfg["early_stopping"] and has_valid and self.state["bad_epochs"] >= tcfg["early_stopping"])
            if stop:
                self.state["epoch"] = epochs  # a resumed run must not train on
            self.save_last()
            if self.dist.main:
                pd.DataFrame(self.state["log"]).to_csv(self.out_dir / "log.csv", index=False)
            self.dist.barrier()
            msg = f"[train] fold {self.fold} epoch {epoch + 1}/{epochs} loss {train_loss:.4f}"
            if has_valid:
                msg += f" valid_loss {row['valid_loss']:.4f} {self.metric.name} {row['score']:.4f}" + (" *" if improved else "")
            if self.dist.main:
                log(msg + f" ({row['seconds']:.1f}s)")
            _kill_hook("epoch", epoch + 1)
            if stop:
                log(f"[train] fold {self.fold}: early stopping after {epoch + 1} epochs "
                    f"(best {self.state['best']:.4f} at epoch {self.state['best_epoch']})")
                break
        if self.swa is not None:
            self.finish_swa(has_valid)
        if not has_valid:  # the all-data model: its final weights are the ones kept
            self.save_weights(self.eval_model(), "best.pt", None, self.state["epoch"])
        return {"fold": self.fold, "best": self.state["best"], "best_epoch": self.state["best_epoch"],
                "epochs": self.state["epoch"], "rows_train": int(len(self.tr_idx)), "rows_valid": int(len(self.va_idx))}

    def finish_swa(self, has_valid: bool):
        """Recompute BatchNorm statistics for the averaged weights; they become the fold's model."""
        from torch.optim.swa_utils import update_bn

        loader = self.loader(self.train_ds, shuffle=True, epoch=10_000)
        update_bn((x.to(self.device) for x, _, _ in loader), self.swa, device=self.device)
        swa_model = self.swa.module
        if has_valid:
            preds, _ = self.predict(swa_model)
            score = self.metric(self.y_valid, preds[self.heads[0].name])
            log(f"[train] fold {self.fold}: SWA of {int(self.swa.n_averaged)} epochs scores {score:.4f} "
                f"(best single epoch {self.state['best']:.4f}); SWA weights saved as best.pt")
            self.state.update(best=score, best_epoch="swa")
            self.save_weights(swa_model, "best.pt", score, "swa", self.preds_frame(preds))
        else:
            self.save_weights(swa_model, "best.pt", None, "swa")


# ------------------------------------------------------------------------------------------- the stage
def fold_ids(cfg: dict, train_df: pd.DataFrame, folds_df: pd.DataFrame) -> np.ndarray:
    id_col = cfg["competition"]["id"]
    merged = train_df[[id_col]].merge(folds_df, on=id_col, how="left")
    if merged["fold"].isna().any() or len(folds_df) != len(train_df):
        missing = merged.loc[merged["fold"].isna(), id_col].head(3).tolist()
        raise InputError(f"the folds file does not cover train.csv (e.g. ids {missing} have no fold, or it has "
                         f"{len(folds_df)} rows for {len(train_df)}); rerun `make folds`.")
    return merged["fold"].astype(int).to_numpy()


def run(cfg: dict, force: bool = False) -> dict:
    started = time.time()
    train_df = load_train(cfg)
    folds_df, folds_hash = load_folds(cfg)
    fold = fold_ids(cfg, train_df, folds_df)
    heads = heads_for(cfg, train_df)
    key = stage_key(cfg, folds_hash, file_hash(table_path(cfg, "train")))
    exp = experiment_dir(cfg)
    exp.mkdir(parents=True, exist_ok=True)
    write_resolved_config(exp / "config.yaml", cfg)
    n_splits = int(fold.max()) + 1
    chosen = cfg["train"]["folds"]
    todo: list = list(range(n_splits)) if chosen is None else [int(k) for k in (chosen if isinstance(chosen, list) else [chosen])]
    bad = [k for k in todo if not 0 <= k < n_splits]
    if bad:
        raise InputError(f"train.folds names fold(s) {bad}, but the folds file has folds 0..{n_splits - 1}.")
    if cfg["train"]["full"]:
        todo.append("full")
    trained = []
    for k in todo:
        out = exp / f"fold{k}"
        meta_path = out / "meta.json"
        if not force and meta_path.exists() and (out / "best.pt").exists() and read_json(meta_path).get("stage_key") == key:
            log(f"[train] fold {k} up to date: {out}")
            continue
        if force and (out / "last.pt").exists():
            (out / "last.pt").unlink()
        tr = np.flatnonzero(fold != k) if k != "full" else np.arange(len(fold))
        va = np.flatnonzero(fold == k) if k != "full" else np.array([], dtype=int)
        trainer = FoldTrainer(cfg, heads, train_df, tr, va, k, out, key, folds_hash)
        log(f"[train] {cfg['name']} fold {k}: {len(tr)} train rows, {len(va)} valid rows, device {trainer.device}"
            + (f", DDP world size {trainer.dist.world}" if trainer.dist.enabled else ""))
        result = trainer.fit()
        if not trainer.dist.main:
            trainer.dist.barrier()
            continue
        write_json(meta_path, provenance(cfg, "train", key, folds_hash=folds_hash, result=result))
        trainer.dist.barrier()
        trained.append(k)
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
                           epochs=epochs, note=f"trained folds {names}")
    return summary


def summarize(cfg: dict, exp: Path, key: str, folds_hash: str) -> dict:
    """CV over the folds trained so far: mean ± std of per-fold scores and the OOF score."""
    metric = get_metric(cfg["competition"]["metric"])
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
    summary = {"experiment": cfg["name"], "metric": metric.name, "folds": scores,
               "cv_mean": float(vals.mean()), "cv_std": float(vals.std())}
    if oof:
        train_df = load_train(cfg, check_images=False)
        id_col = cfg["competition"]["id"]
        o = pd.concat(oof).merge(train_df[[id_col, targets(cfg)[0]]], on=id_col)
        head = heads_for(cfg, train_df)[0].name
        cols = [c for c in o.columns if c.startswith(f"{head}__")]
        pred = o[cols].to_numpy() if len(cols) > 1 else o[cols[0]].to_numpy()
        summary["oof_score"] = metric(o[targets(cfg)[0]].to_numpy(), pred)
        summary["oof_rows"] = int(len(o))
    write_json(exp / "summary.json", provenance(cfg, "train", key, folds_hash=folds_hash, summary=summary))
    if logs:
        save_figure(exp / "curves.png", plot_curves(pd.concat(logs), metric.name, cfg["name"]))
    log(f"[train] {cfg['name']}: CV {metric.name} {summary['cv_mean']:.4f} ± {summary['cv_std']:.4f} over "
        f"{len(vals)} fold(s)" + (f", OOF {summary['oof_score']:.4f}" if "oof_score" in summary else ""))
    return summary


def plot_curves(logs: pd.DataFrame, metric_name: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in ("train_loss", "valid_loss", "score") if c in logs.columns]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.4))
    axes = np.atleast_1d(axes)
    for ax, col in zip(axes, cols):
        stats = logs.groupby("epoch")[col].agg(["mean", "std"]).fillna(0)
        ax.plot(stats.index, stats["mean"], marker="o")
        ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.25)
        ax.set(title=metric_name if col == "score" else col, xlabel="epoch")
    fig.suptitle(f"{title}: mean ± std over folds")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ lr finder
def lr_find(cfg: dict, force: bool = False) -> Path:
    """``make lr-find``: sweep the lr exponentially over fold 0's training rows, plot loss vs lr (PNG),
    and suggest the lr of steepest descent of the smoothed loss."""
    lcfg = cfg["lr_find"]
    train_df = load_train(cfg)
    folds_df, folds_hash = load_folds(cfg)
    fold = fold_ids(cfg, train_df, folds_df)
    heads = heads_for(cfg, train_df)
    run_cfg = {**cfg, "train": {**cfg["train"], "scheduler": "none", "ema": False, "swa": False}}
    out = experiment_dir(cfg)
    trainer = FoldTrainer(run_cfg, heads, train_df, np.flatnonzero(fold != 0), np.array([], dtype=int), 0,
                          out / "lr_find", "lr-find", folds_hash)
    lrs = np.geomspace(lcfg["start"], lcfg["end"], lcfg["steps"])
    mults = [g["lr"] / cfg["train"]["lr"] if cfg["train"]["lr"] else 1.0 for g in trainer.opt.param_groups]
    trainer.model.train()
    seed_everything(cfg["seed"])
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
        avg = lcfg["smoothing"] * avg + (1 - lcfg["smoothing"]) * value
        sm = avg / (1 - lcfg["smoothing"] ** (i + 1))
        losses.append(value)
        smooth.append(sm)
        best = min(best, sm)
        if not math.isfinite(sm) or sm > lcfg["diverge"] * best:
            break
    n = len(smooth)
    lr_used, sm = lrs[:n], np.array(smooth)
    upto = int(np.argmin(sm)) + 1
    grad = np.gradient(sm[:upto], np.log10(lr_used[:upto])) if upto > 2 else np.zeros(upto)
    suggestion = float(lr_used[int(np.argmin(grad))]) if upto > 2 else float(lr_used[0])
    df = pd.DataFrame({"lr": lr_used, "loss": losses, "smoothed": smooth})
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "lr_find.csv", index=False)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lr_used, losses, alpha=0.3, label="loss")
    ax.plot(lr_used, smooth, label="smoothed")
    ax.axvline(suggestion, color="r", ls="--", label=f"suggested {suggestion:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss", title=f"{cfg['name']}: lr finder (fold 0 rows)")
    ax.set_ylim(top=min(max(smooth) * 1.1, best * lcfg["diverge"] * 1.1))
    ax.legend()
    save_figure(out / "lr_find.png", fig)
    log(f"[lr-find] {n} steps from {lrs[0]:.1e}; steepest descent at lr {suggestion:.2e} "
        f"(minimum smoothed loss at {lr_used[upto - 1]:.2e}); plot {out / 'lr_find.png'}")
    return out / "lr_find.png"
