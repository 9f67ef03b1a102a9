"""The ``train:`` section of the typed config: the fold training loop's options, with its pseudo-label and
distillation rounds (``train.pseudo``, ``train.distill``)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from pipeline.config.types import Optimizer, Scheduler, Section


class Pseudo(Section):
    """Pseudo-labels: confidently predicted test rows join each fold's training rows. Fold k takes them
    from the teacher's own fold-k model (which never saw fold k's validation rows)."""
    source: str | None = None  # feature set (level-1 experiment) whose per-fold test predictions label rows
    threshold: float = Field(0.9, ge=0, le=1)  # keep a test row when its top class probability >= this
    weight: float = Field(1.0, gt=0)  # loss weight of a pseudo-labelled row (a labelled row weighs 1)
    soft: bool = False  # train on the teacher's probabilities instead of its arg-max class


class Distill(Section):
    """Knowledge distillation: loss = (1 - alpha) * hard-label loss + alpha * T^2 * KL(teacher_T || student_T).
    Fold k's soft targets come from the teacher's fold-k model (in-sample on fold k's training rows,
    but it never saw fold k's validation rows); ``allow_leak`` uses the teacher's OOF predictions
    instead, which carry fold k's validation labels into fold k's model (the leaderboard marks it)."""
    teacher: str | None = None  # a level-1 experiment with models/<teacher>/fold<k>/best.pt
    alpha: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(2.0, gt=0)
    allow_leak: bool = False


class Train(Section):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Optimizer = "adam"  # any timm optimizer (pipeline.training.optim.OPTIMIZERS)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    optimizer_args: dict[str, Any] = {}
    backbone_lr_mult: float = Field(1.0, ge=0)  # discriminative lr: backbone lr = lr * this
    # layer-wise lr decay over timm's layer groups of the backbone (group_matcher): the last at lr, each
    # one below at layer_decay times the one above (0.65-0.85 for fine-tuning pretrained weights); None: off
    layer_decay: float | None = Field(None, gt=0, le=1)
    freeze_backbone_epochs: int = Field(0, ge=0)  # train the heads only for this many epochs, then unfreeze
    scheduler: Scheduler = "cosine"  # registry: pipeline.training.optim.SCHEDULERS
    scheduler_args: dict[str, Any] = {}  # timm.<name> schedulers: more create_scheduler_v2 arguments
    warmup_epochs: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    cycle_epochs: int = Field(0, ge=0)  # restarts: epochs per cosine cycle; a snapshot is saved at each cycle end
    milestones: list[int] = []
    gamma: float = Field(0.1, gt=0)
    patience: int = Field(2, ge=0)  # plateau: scored epochs without improvement before the lr is cut by gamma
    loss: str = "auto"  # registry: pipeline.training.losses.LOSSES[head kind]
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: None | Literal["balanced"] | list[float] = None  # per-class weights for ce/focal
    focal_gamma: float = Field(2.0, ge=0)
    asl_gamma_neg: float = Field(4.0, ge=0)  # train.loss=asl (label sets): how fast easy absent labels fade
    asl_clip: float = Field(0.05, ge=0, lt=1)  # train.loss=asl: absent labels' probability shift
    ohem: float = Field(1.0, gt=0, le=1)  # top-k loss: keep this fraction of the hardest samples of each batch
    loss_weights: dict[str, float] = {}
    grad_clip: float = Field(0.0, ge=0)
    accumulate: int = Field(1, ge=1)
    amp: bool = True  # only on CUDA: bf16 where supported, else fp16 with a grad scaler
    channels_last: bool = False
    ema: bool = False
    ema_decay: float = Field(0.999, gt=0, lt=1)
    # optimizer steps until ema_decay is reached: auto = a tenth of the run, an integer, or 0 (none)
    ema_warmup: Literal["auto"] | Annotated[int, Field(ge=0)] = "auto"
    swa: bool = False
    swa_start: float = Field(0.75, gt=0)  # < 1: fraction of the epochs after which weights are averaged
    multiscale: list[int] = []  # e.g. [24, 32, 40]: a random input size per batch
    sync_bn: bool = False  # under torchrun: SyncBatchNorm across processes
    mixup: float = Field(0.0, ge=0)  # alpha; 0 = off
    cutmix: float = Field(0.0, ge=0)
    mix_prob: float = Field(0.5, ge=0, le=1)
    mix_off_epoch: int | None = Field(None, ge=0)
    early_stopping: int = Field(0, ge=0)  # patience in validated epochs; 0 = off
    valid_from: int = Field(1, ge=1)  # first epoch (1-based) scored on the fold's validation rows; the last always is
    folds: None | int | list[int] = None  # subset of folds to train, e.g. [0, 2]
    full: bool = False  # also train one model on all rows
    device: str = "auto"
    augment: list[str | dict[str, Any]] = []  # albumentations transforms: [{HorizontalFlip: {p: 0.5}}, ...]
    pseudo: Pseudo = Pseudo()
    distill: Distill = Distill()

    @field_validator("multiscale")
    @classmethod
    def _sizes(cls, v):
        if any(s < 8 for s in v):
            raise ValueError("every size must be >= 8 pixels")
        return v
