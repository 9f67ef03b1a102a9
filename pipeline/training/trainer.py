"""The training loop of one fold: epochs and batches, validation, checkpoints, resume.

``FoldTrainer`` is used by the ``train`` stage (one per fold), by ``pretrain`` (the jigsaw task, through
its own datasets and metric) and by ``lr_find``. It owns the tricks that act inside the loop: EMA
weights (the ones validated and saved), SWA, mixup/cutmix, multi-scale batches, gradient
accumulation and clipping, AMP on CUDA, channels_last, DDP under torchrun, early stopping. Every
epoch is reseeded from (seed, fold, epoch), so a resumed run ends with the same weights as an
uninterrupted one.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data.mixup import cutmix_bbox_and_lam
from torch.utils.data import DataLoader

from pipeline.competition.images import loader_workers, seed_everything
from pipeline.errors import PipelineError
from pipeline.metrics import get_metric
from pipeline.store.artifacts import kill_point
from pipeline.store.io import log, write_parquet
from pipeline.store.paths import main_head, targets, valid_column
from pipeline.training import resume
from pipeline.training.averaging import ModelEma, warmup_steps
from pipeline.training.build import build_model
from pipeline.training.checkpoint import Checkpoint
from pipeline.training.distributed import Dist
from pipeline.training.fold_data import fold_datasets
from pipeline.training.loaders import Loaders
from pipeline.training.losses import Criterion, margin_for
from pipeline.training.models import Head, activate, freeze_stages, pick_device
from pipeline.training.optim import SCHEDULERS, build_optimizer, steps_each_batch
from pipeline.training.pretrained import with_normalization

if TYPE_CHECKING:
    from pipeline.config.schema import Config


# ---------------------------------------------------------------------------------------- utilities
def epoch_seed(seed: int, fold, epoch: int) -> int:
    f = int(fold) if str(fold).isdigit() else {"full": -1}.get(str(fold), -2)
    return (seed * 1_000_003 + (f + 2) * 10_007 + epoch * 101) % 2**31


def mix_batch(x, y: dict, tcfg, epoch: int):
    """Mixup or cutmix (chosen at random when both are on); returns x, y of the partner rows, lambda.
    The cutmix box is timm's (``timm.data.mixup.cutmix_bbox_and_lam``). timm's ``Mixup`` class itself is
    not used: it mixes one target into smoothed one-hot rows of one head, and here every head's targets
    (regressions, auxiliary heads, label sets) are mixed by the loss with the same lambda."""
    alphas = [(n, getattr(tcfg, n)) for n in ("mixup", "cutmix") if getattr(tcfg, n) > 0]
    off = tcfg.mix_off_epoch
    if not alphas or (off is not None and epoch >= off) or torch.rand(()) >= tcfg.mix_prob:
        return x, None, 1.0
    kind, alpha = alphas[int(torch.randint(len(alphas), ()))]
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.size(0))
    y2 = {k: v[perm] for k, v in y.items()}
    if kind == "mixup":
        return lam * x + (1 - lam) * x[perm], y2, lam
    (y0, y1, x0, x1), lam = cutmix_bbox_and_lam(x.shape, lam)  # timm's box, lambda corrected to its area
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return x, y2, float(lam)


def to_device(y: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in y.items()}



class TrainingDiverged(PipelineError):
    """A NaN or infinite loss: the config's to fix (learning rate, clipping, AMP), never a saved model."""


class FoldTrainer:
    """Trains one fold: the loop over epochs and batches, validation, checkpoints, resume."""

    def __init__(self, cfg: Config, heads: list[Head], train_df: pd.DataFrame, tr_idx, va_idx, fold, out_dir: Path,
                 key: str, folds_hash: str, datasets: tuple | None = None, metric=None, train: dict | None = None,
                 init: str | None = "model.init", cache_images: bool | None = None, on_epoch=()):
        """The loop's own options, for a loop that is not the config's training (pretrain, lr_find):
        ``train`` (a validated ``train`` section: ``config.train.Train(...)``) replaces the config's,
        ``init`` the starting weights (a path, or None: from scratch), ``cache_images`` data.cache's choice;
        ``datasets`` = (train, valid, valid targets) the competition's labelled images (the jigsaw pretext
        task trains through this same loop), ``metric`` the competition metric. ``on_epoch``: callables
        ``(fold, epoch, score)`` after each validation; one may raise to stop (tune: optuna.TrialPruned)."""
        cfg = with_normalization(cfg)  # data.mean/std as data.normalize says: what every checkpoint records
        self.cfg, self.tcfg, self.heads, self.fold = cfg, train or cfg.train, heads, fold
        self.init = init  # "model.init": the config's, per fold (build_model formats its {fold})
        self.on_epoch = list(on_epoch)
        self.out_dir, self.key, self.folds_hash = out_dir, key, folds_hash
        self.metric = metric or get_metric(cfg.competition.metric)
        self.dist = Dist()
        self.device = self.dist.setup(pick_device(self.tcfg.device))
        self.ids = train_df[cfg.competition.id].to_numpy()
        self.tr_idx, self.va_idx = np.asarray(tr_idx), np.asarray(va_idx)
        main_targets = {h.name for h in heads if h.name in (*targets(cfg), main_head(cfg))} or {heads[0].name}
        cw = None
        if datasets is None:
            data = fold_datasets(cfg, heads, train_df, self.tr_idx, self.va_idx, fold, folds_hash, self.device,
                                 self.dist.local_world, cache_images)
            self.train_ds, self.valid_ds, self.y_valid, cw = data.train, data.valid, data.y_valid, data.class_weights
        else:
            self.train_ds, self.valid_ds, self.y_valid = datasets
        self.criterion = Criterion(heads, self.tcfg, main_targets, cw, margin_for(cfg.model)).to(self.device)
        # the validation loss is the plain one (each head's default loss; no smoothing, class weights or OHEM),
        # so it compares across configs
        plain = {"loss": "auto", "label_smoothing": 0.0, "focal_gamma": 0.0, "ohem": 1.0, "distill": None}
        self.valid_criterion = Criterion(heads, plain, set()).to(self.device)
        self.steps_per_epoch = max(1, math.ceil(len(self.train_ds) / self.tcfg.batch_size / self.tcfg.accumulate))
        self.loaders = Loaders(self.tcfg.batch_size, loader_workers(cfg.data, self.device),
                               self.device.type == "cuda", self.dist)
        self.build()

    # -- construction
    def build(self):
        cfg, tcfg = self.cfg, self.tcfg
        seed_everything(epoch_seed(cfg.seed, self.fold, -1))
        self.model = build_model(cfg, self.heads, self.fold, self.init).to(self.device)
        self.frozen = freeze_stages(self.model.backbone, cfg.model.freeze_stages)
        if self.frozen and self.dist.main:
            total = sum(p.numel() for p in self.model.parameters())
            train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            log(f"[train] fold {self.fold}: model.freeze_stages={cfg.model.freeze_stages}: {train:,} of {total:,} "
                f"parameters train ({train / total:.1%})")
        if tcfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = self.model  # what the training forward pass runs (DDP-wrapped under torchrun)
        if self.dist.enabled:
            if tcfg.sync_bn and self.device.type == "cuda":
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            elif tcfg.sync_bn and self.dist.main:
                log("[train] train.sync_bn: SyncBatchNorm needs CUDA; each CPU process keeps its own BatchNorm statistics")
            ids = [self.device.index] if self.device.type == "cuda" else None
            # a head-only warm-up freezes the backbone after DDP is built: those parameters get no gradient
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                           find_unused_parameters=tcfg.freeze_backbone_epochs > 0)
        self.opt = build_optimizer(self.model, tcfg)
        self.sched = SCHEDULERS[tcfg.scheduler](self.opt, tcfg, self.steps_per_epoch, self.metric.higher_is_better)
        self.ema = None
        if tcfg.ema:
            total = self.steps_per_epoch * tcfg.epochs
            self.ema = ModelEma(self.model, tcfg.ema_decay, warmup_steps(tcfg.ema_warmup, total))
            if self.dist.main:
                log(f"[train] fold {self.fold}: EMA decay {tcfg.ema_decay} reached after {self.ema.warmup} of "
                    f"{total} optimizer steps (train.ema_warmup={tcfg.ema_warmup}){self.ema.horizon_warning(total)}")
        self.swa = None
        self.amp_dtype = None
        if tcfg.amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.state = {"epoch": 0, "best": None, "best_epoch": -1, "bad_epochs": 0, "log": [], "swa_n": 0}

    # -- checkpoints
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def save_last(self):
        if self.dist.main:
            resume.save(self, self.out_dir / "last.pt")

    def try_resume(self) -> bool:
        return resume.restore(self, self.out_dir / "last.pt")

    def _new_swa(self):
        from torch.optim.swa_utils import AveragedModel

        return AveragedModel(self.model)

    def save_weights(self, model: nn.Module, name: str, score, epoch, preds=None):
        if not self.dist.main:
            return
        Checkpoint.of(model, self.cfg, fold=self.fold, epoch=epoch, score=score, metric=self.metric.name,
                      stage_key=self.key, folds_hash=self.folds_hash).write(self.out_dir / name)
        if preds is not None:
            write_parquet(self.out_dir / name.replace(".pt", "_valid.parquet"), preds,
                          {"fold": self.fold, "epoch": epoch, "stage_key": self.key})

    # -- loops
    def loader(self, ds, shuffle: bool, epoch: int = 0) -> DataLoader:
        return self.loaders.get(ds, shuffle, epoch_seed(self.cfg.seed, self.fold, epoch))

    def set_backbone_trainable(self, epoch: int):
        frozen_epochs = self.tcfg.freeze_backbone_epochs
        trainable = epoch >= frozen_epochs
        for n, p in self.model.backbone.named_parameters():
            p.requires_grad_(trainable and n not in self.frozen)

    def train_epoch(self, epoch: int) -> float:
        from tqdm.auto import tqdm

        tcfg = self.tcfg
        self.model.train()
        self.set_backbone_trainable(epoch)
        seed = epoch_seed(self.cfg.seed, self.fold, epoch)
        seed_everything(seed)
        self.train_ds.set_epoch(seed + self.dist.rank)
        loader = self.loader(self.train_ds, shuffle=True, epoch=epoch)
        # the running loss stays on the device (reading it every step would wait for the GPU each batch); the
        # postfix reads it at most once a second
        total, n, t0 = torch.zeros((), device=self.device), 0, time.time()
        shown, batches = t0, iter(loader)  # the bar only counts: tqdm.auto's bar iter()s what it wraps when made,
        # which started the loader's workers twice an epoch (bench/train_step_parts.py)
        bar = tqdm(total=len(loader), desc=f"fold {self.fold} ep {epoch + 1}/{tcfg.epochs}", leave=False,
                   mininterval=1, dynamic_ncols=True, disable=not self.dist.main)
        accum = tcfg.accumulate
        self.opt.zero_grad(set_to_none=True)
        for step, (x, y, _) in enumerate(batches):
            kill_point(f"step:{step + epoch * len(loader)}")
            x = x.to(self.device, non_blocking=True)
            y = to_device(y, self.device)
            if tcfg.multiscale:
                size = int(tcfg.multiscale[int(torch.randint(len(tcfg.multiscale), ()))])
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            if tcfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x, y2, lam = mix_batch(x, y, tcfg, epoch)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.net(x)
                loss = self.criterion(out, y, y2, lam)
            self.scaler.scale(loss / accum).backward()
            last = step + 1 == len(loader)
            if (step + 1) % accum == 0 or last:
                if tcfg.grad_clip:
                    self.scaler.unscale_(self.opt)
                    nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip)
                self.scaler.step(self.opt)
                self.scaler.update()
                self.opt.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.model)
                if steps_each_batch(self.sched):
                    self.sched.step()
            total += loss.detach().float() * len(x)
            n += len(x)
            if bar.disable or time.time() - shown < 1.0:
                continue
            shown, best = time.time(), self.state["best"]
            bar.update(step + 1 - bar.n)
            bar.set_postfix({"loss": f"{float(total) / n:.4f}", f"best {self.metric.name}": "-" if best is None else
                             f"{best:.4f}", "lr": f"{self.opt.param_groups[-1]['lr']:.2e}",
                             "img/s": f"{n / max(time.time() - t0, 1e-9):.0f}"}, refresh=False)
        bar.update(bar.total - bar.n)  # a notebook shows an unfinished bar in red
        bar.close()
        return float(total) / max(n, 1)

    @torch.no_grad()
    def predict(self, model: nn.Module) -> tuple[dict[str, np.ndarray], float]:
        model.eval()
        outs: dict[str, list] = {h.name: [] for h in self.heads}
        total, n = 0.0, 0
        for x, y, _ in self.loader(self.valid_ds, shuffle=False):
            x = x.to(self.device)
            if self.tcfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = model(x)
            total += float(self.valid_criterion(out, to_device(y, self.device))) * len(x)
            n += len(x)
            for h in self.heads:
                outs[h.name].append(activate(h, out[h.name]).cpu().numpy())
        return {k: np.concatenate(v) for k, v in outs.items()}, total / max(n, 1)

    def preds_frame(self, preds: dict[str, np.ndarray]) -> pd.DataFrame:
        id_col = self.cfg.competition.id
        df = pd.DataFrame({id_col: self.ids[self.va_idx]})
        for name, p in preds.items():
            p = p.reshape(len(p), -1)
            for j in range(p.shape[1]):
                df[valid_column(name, j)] = p[:, j]
        return df

    def fit(self) -> dict:
        tcfg = self.tcfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.try_resume()
        has_valid = len(self.va_idx) > 0
        epochs = tcfg.epochs
        swa_start = int(tcfg.swa_start * epochs) if tcfg.swa_start < 1 else int(tcfg.swa_start)
        while self.state["epoch"] < epochs:
            epoch = self.state["epoch"]
            t0 = time.time()
            train_loss = self.train_epoch(epoch)
            if not math.isfinite(train_loss):  # nothing of this epoch is saved: last.pt stays the epoch before
                raise TrainingDiverged(f"train fold {self.fold} epoch {epoch + 1}/{epochs}: the training loss is "
                                       f"{train_loss} (the run diverged); lower train.lr (now {tcfg.lr}), set "
                                       "train.grad_clip, or turn train.amp off, then rerun")
            if tcfg.swa and epoch >= swa_start:
                if self.swa is None:
                    self.swa = self._new_swa()
                self.swa.update_parameters(self.eval_model())
            row = {"fold": self.fold, "epoch": epoch + 1, "train_loss": train_loss,
                   "lr": self.opt.param_groups[-1]["lr"], "seconds": 0.0}
            validate = has_valid and (epoch + 1 >= tcfg.valid_from or epoch + 1 == epochs)
            improved = self.validate(epoch, row) if validate else False
            if tcfg.scheduler == "restarts" and tcfg.cycle_epochs and (epoch + 1) % tcfg.cycle_epochs == 0:
                self.save_weights(self.eval_model(), f"snapshot_e{epoch + 1}.pt", row.get("score"), epoch + 1)
            row["seconds"] = round(time.time() - t0, 2)
            self.state["log"].append(row)
            self.state["epoch"] = epoch + 1
            stop = bool(tcfg.early_stopping and validate and self.state["bad_epochs"] >= tcfg.early_stopping)
            if stop:
                self.state["epoch"] = epochs  # a resumed run must not train on
            self.save_last()
            if self.dist.main:
                pd.DataFrame(self.state["log"]).to_csv(self.out_dir / "log.csv", index=False)
            self.dist.barrier()
            if self.dist.main:
                log(self.epoch_line(row, validate, improved))
            kill_point(f"epoch:{epoch + 1}")
            for hook in self.on_epoch if validate else ():
                hook(self.fold, epoch + 1, row["score"])  # may raise (tune: optuna.TrialPruned)
            if stop:
                log(f"[train] fold {self.fold}: early stopping after {epoch + 1} epochs "
                    f"(best {self.state['best']:.4f} at epoch {self.state['best_epoch']})")
                break
        if not self.dist.weights_agree(self.model, self.device):
            raise RuntimeError(f"train fold {self.fold}: the DDP processes ended with different weights")
        if self.dist.enabled and self.dist.main:
            log(f"[train] fold {self.fold}: the {self.dist.world} DDP processes end with the same weights")
        if self.swa is not None:
            self.finish_swa(has_valid)
        if not has_valid:  # the all-data model: its final weights are the ones kept
            self.save_weights(self.eval_model(), "best.pt", None, self.state["epoch"])
        self.loaders.close()  # the persistent loader workers end with the fold
        return {"fold": self.fold, "best": self.state["best"], "best_epoch": self.state["best_epoch"],
                "epochs": self.state["epoch"], "rows_train": int(len(self.tr_idx)), "rows_valid": int(len(self.va_idx))}

    def validate(self, epoch: int, row: dict) -> bool:
        """Score the evaluated weights on the fold's validation rows; keep them as best.pt when they improve."""
        preds, valid_loss = self.predict(self.eval_model())
        score = self.metric(self.y_valid, preds[self.heads[0].name])
        row.update(valid_loss=valid_loss, score=score)
        improved = self.metric.better(score, self.state["best"])
        if improved:
            self.state.update(best=score, best_epoch=epoch + 1, bad_epochs=0)
            self.save_weights(self.eval_model(), "best.pt", score, epoch + 1, self.preds_frame(preds))
        else:
            self.state["bad_epochs"] += 1
        if not steps_each_batch(self.sched):
            self.sched.step(score)
        return improved

    def epoch_line(self, row: dict, validated: bool, improved: bool) -> str:
        msg = f"[train] fold {self.fold} epoch {row['epoch']}/{self.tcfg.epochs} loss {row['train_loss']:.4f}"
        if validated:
            msg += f" valid_loss {row['valid_loss']:.4f} {self.metric.name} {row['score']:.4f}" + (" *" if improved else "")
        if self.ema is not None:
            msg += f" ema_decay {self.ema.decay_at(self.ema.updates):.4g}"
        return msg + f" ({row['seconds']:.1f}s)"

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


