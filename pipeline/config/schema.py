"""The typed config: every key, its type, allowed values, range and default, checked before any work.

``Config`` (pydantic) is the one home of the defaults; ``DEFAULTS`` is its dump. Enumerated values
that name a builder (optimizer, scheduler, loss, level-2 model, TTA set) are checked against the
registry that holds the builders, so adding one means one function and one table entry there.
"""
from __future__ import annotations

import copy
import re
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.config.kaggle import Kaggle  # make kaggle (pipeline/stages/kaggle.py)
from pipeline.config.train import Train
from pipeline.config.tune import Tune
from pipeline.config.types import (
    HomePath,
    ImagePattern,
    InitPath,
    Level2Model,
    MetricName,
    Optimizer,
    PoolName,
    SafeName,
    Scheduler,
    Section,
    TaskName,
    TtaSet,
)
from pipeline.errors import ConfigError
from pipeline.metrics import METRICS
from pipeline.tasks import HEAD_KINDS, TASKS, get_task

# which competition metrics make sense for which task (a metric on the wrong task is refused): tasks.TASKS
METRIC_TASKS = {m: tuple(name for name, t in TASKS.items() if m in t.metrics) for m in METRICS}


class Competition(Section):
    name: SafeName = "demo"
    root: HomePath = "data/demo"
    train: str = "train.csv"
    test: str = "test.csv"
    sample_submission: str = "sample_submission.csv"
    solution: str = "solution.csv"
    # where each row's image is, under root: one pattern ({id}, and {split} = train or test), or one per split
    # (train_image / test_image, e.g. train_images/{id}.jpg and test_images/{id}.jpg), or a column of
    # train.csv / test.csv holding each row's path (path_column; `python -m pipeline index` writes one
    # for a class-folder layout train/<label>/*.jpg)
    image: ImagePattern = "images/{id}.png"
    train_image: ImagePattern | None = None
    test_image: ImagePattern | None = None
    path_column: str | None = None
    id: str = "id"
    target: str | list[str] = "target"
    task: TaskName = "multiclass"
    num_classes: int | None = Field(None, ge=2)  # inferred from train.csv when None (classification)
    metric: MetricName = "accuracy"  # a name of pipeline.metrics.METRICS
    group: str | None = None
    tabular: list[str] = []
    categorical: list[str] = []
    aux_targets: list[str | dict[str, Any]] = []
    # folds checks every train and test image before any training: header (fast) | decode (full) |
    # exists | false; later stages only check that the files exist
    check_images: Literal["header", "decode", "exists"] | bool = "header"

    @model_validator(mode="after")
    def _metric_fits_task(self):
        allowed = TASKS[self.task].metrics  # (asked at validation: a task kind added later counts too)
        if self.metric not in allowed:
            raise ValueError(f"competition.metric '{self.metric}' does not apply to task '{self.task}'; for "
                             f"'{self.task}' use one of {', '.join(allowed)}")
        return self


class Folds(Section):
    file: str = "folds/{competition}.csv"  # relative to workdir
    method: Literal["auto", "stratified_group", "stratified", "group", "kfold"] = "auto"
    n_splits: int = Field(5, ge=2)
    seed: int = 42
    bins: int = Field(10, ge=2)  # quantile bins used to stratify a continuous target
    balance: bool = False  # move whole groups (or rows) so fold sizes match
    search: int = Field(1, ge=1)  # try this many seeds and keep the best-stratified split
    # split R times with different seeds (columns fold, fold_1, ...): R x n_splits models, R OOF predictions per
    # row from models that never saw it; their mean estimates what an ensemble scores (the fold-mean submission)
    repeats: int = Field(1, ge=1)


class Data(Section):
    in_chans: int = Field(3, ge=1)
    image_size: int = Field(32, ge=1)
    # decode a JPEG straight at the smallest 1/2, 1/4, 1/8 scale that still covers image_size (PIL draft mode;
    # the resize then starts from far fewer pixels; bench/loader_throughput.py); false: full size, then resize
    jpeg_draft: bool = True
    # model: the pretrained weights' mean/std (timm pretrained_cfg) | imagenet | none (pixels / 255) | dataset
    # (data.mean/data.std, 0.5 when unset); auto = model with model.pretrained, else dataset
    normalize: Literal["auto", "model", "imagenet", "none", "dataset"] = "auto"
    mean: list[float] | None = None  # per-channel, with normalize=dataset; None = (0.5,)*in_chans
    std: list[float] | None = None
    # keep decoded images in memory (preloaded before the loader workers start); auto = when they take at
    # most a quarter of the free memory (pipeline.competition.images.resolve_cache)
    cache: bool | Literal["auto"] = "auto"
    # data-loader processes; auto = min(cores - 1, 8) when training on a GPU (the loader must keep up with
    # it), 0 on the CPU (the model already uses every core)
    num_workers: Literal["auto"] | Annotated[int, Field(ge=0)] = "auto"


class Model(Section):
    backbone: str = "resnet18"
    # pretrained timm weights, never a download: a .safetensors/.pth/.bin file, a Hub-layout folder
    # (config.json + model.safetensors), a Hugging Face cache folder or a Kaggle Models mount
    pretrained: str | None = None
    # then (or instead) a local weights file (our jigsaw pretraining, a fold checkpoint): its matching keys
    # are loaded into the backbone; {fold} = each fold's own file
    init: InitPath | None = None
    pool: PoolName = "avg"  # registry: pipeline.training.models.POOLS
    bnneck: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    freeze_stages: int = Field(0, ge=0)  # freeze the stem and the first N stages for the whole run
    # the class head: linear, or class centres on the unit sphere with an angular margin in training (metric
    # learning: ArcFace cos(theta + m), CosFace cos(theta) - m), logits = head_scale * cos; multiclass heads
    head: Literal["linear", "arcface", "cosface"] = "linear"
    head_scale: float = Field(30.0, gt=0)
    head_margin: float | None = Field(None, ge=0, lt=1.5)  # None: 0.5 (arcface), 0.35 (cosface)
    head_subcenters: int = Field(1, ge=1)  # centres per class (the closest counts): noisy or multi-modal classes


class LrFind(Section):
    start: float = Field(1e-7, gt=0)
    end: float = Field(1.0, gt=0)
    steps: int = Field(100, ge=3)
    smoothing: float = Field(0.9, ge=0, lt=1)  # exponential smoothing of the loss curve
    diverge: float = Field(4.0, gt=1)  # stop once the smoothed loss exceeds this multiple of its minimum


class Pretrain(Section):
    formulation: Literal["position", "permutation"] = "position"
    grid: int = Field(3, ge=2)
    n_permutations: int = Field(100, ge=2)  # permutation formulation: chosen for maximal Hamming distance
    gap: int = Field(2, ge=0)  # pixels dropped between tiles, with random jitter in training
    tile_norm: bool = True  # normalise every tile on its own (no brightness shortcut)
    dihedral: bool = True  # random flip/rotation (the 8 D4 views) of each image as extra inputs
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Optimizer = "adam"
    scheduler: Scheduler = "cosine"
    valid_fraction: float = Field(0.05, gt=0, lt=1)  # held-out images for the puzzle accuracy
    max_images: int = Field(0, ge=0)  # 0 = every train and test image
    init: str | None = None  # continue from a local weights file
    output: str = "models/pretrain/{name}-{backbone}.pt"  # relative to workdir


class Knn(Section):
    """``make knn``: nearest-neighbour class scores from the fold models' embeddings (pipeline.stages.knn)."""
    name: SafeName | None = None  # the feature set written; default <name>-knn
    k: int = Field(20, ge=1)  # neighbours searched per row
    scale: float = Field(30.0, gt=0)  # softmax scale of the neighbours' cosine similarities
    batch_size: int = Field(256, ge=1)
    new_label: str | int | None = None  # the class meaning "not a known individual" (e.g. new_whale)
    new_threshold: float | None = Field(None, ge=-1, le=1)  # its similarity threshold; None: tuned on OOF, nested


class Features(Section):
    tta: TtaSet = "none"  # registry: pipeline.predict.tta.TTA_SETS (identity view first)
    scales: list[float] = [1.0]  # multi-scale TTA: input scale factors, e.g. [0.875, 1.0, 1.125]
    stats: list[Literal["mean", "var", "max", "min"]] = ["mean", "var", "max", "min"]
    keep_views: bool = False
    batch_size: int = Field(256, ge=1)
    embedding: bool = False  # also dump the pooled backbone embedding (identity view)
    pca: int = Field(0, ge=0)  # reduce it to this many components, PCA fitted inside each fold on its train rows
    # the all-data model (train.full): true = it joins the fold mean on test; "only" = it alone predicts test
    # (one model to ship; the fold models still make the OOF rows, so CV is then a single model's, like the test's)
    use_full: bool | Literal["only"] = False

    @field_validator("scales")
    @classmethod
    def _scales(cls, v):
        if not v or any(s <= 0 for s in v):
            raise ValueError("scales must be a non-empty list of positive factors, e.g. [1.0, 1.125]")
        return v

    @field_validator("stats")
    @classmethod
    def _stats(cls, v):
        if not v:
            raise ValueError("name at least one statistic (mean, var, max, min)")
        return v


class Stack(Section):
    name: SafeName | None = None  # output feature set; default: the experiment name (+ "-l2" if it is also an input)
    experiments: list[str] = []  # level-1 experiments to stack; default: this config's own experiment
    # auto: the weighted blend or LightGBM, whichever scores better on OOF (fold k's rows: on the other folds)
    model: Level2Model = "auto"
    stat: str = "mean"  # weighted: which per-view statistic (or view, e.g. v0) of each experiment to blend
    use_tabular: bool = True
    test_mode: Literal["mean", "refit"] = "mean"
    refit_coef: float = Field(1.0, gt=0)
    lgbm: dict[str, Any] = {}


class Postprocess(Section):
    source: str | None = None  # feature set to post-process; default: this config's level 2, else its level 1
    name: SafeName | None = None  # output feature set; default: <source>-pp
    blend_with: str | None = None  # a level-1 experiment to blend with (the atmaCup11 author used 0.5)
    blend_weight: float | None = Field(None, ge=0, le=1)  # fixed weight of the source; None = tuned on OOF
    force_from: dict[str, str] | None = None  # {experiment: x, head: y}: force class i when p > t
    force_threshold: float | None = Field(None, gt=0, lt=1)  # fixed t (the author used 0.94); None = tuned
    class_scale: bool = False  # per-class probability multipliers (multiclass)
    threshold: bool = False  # decision threshold (binary); one per label (multilabel)
    rounding: bool = False  # optimised rounding thresholds (ordinal / regression, e.g. QWK)
    clip: bool | list[float] = False  # true = clip to the train target's range, or [lo, hi]

    @field_validator("force_from")
    @classmethod
    def _force_from(cls, v):
        if v is not None and "experiment" not in v:
            raise ValueError("force_from needs 'experiment' (and optionally 'head')")
        return v

    @field_validator("clip")
    @classmethod
    def _clip(cls, v):
        if isinstance(v, list) and (len(v) != 2 or v[0] > v[1]):
            raise ValueError("clip must be true/false or [lo, hi] with lo <= hi")
        return v


class Leaderboard(Section):
    enabled: bool = True
    path: HomePath = "submissions/leaderboard.db"  # relative to workdir
    mlflow: bool = False  # also log to MLflow when the package is installed
    mlflow_uri: str | None = None  # default: a local file store, file:./mlruns
    url: str | None = None  # a server database for a team (postgresql://user@host/db); overrides path

    @field_validator("url")
    @classmethod
    def _url(cls, v):
        if v is not None and not re.match(r"^(postgresql|sqlite)(\+\w+)?://", v):
            raise ValueError("must be a SQLAlchemy URL: postgresql://user@host:5432/db (password from PGPASSWORD "
                             "or ~/.pgpass) or sqlite:///file.db; for a local file set leaderboard.path instead")
        return v


class Submit(Section):
    source: str | None = None  # feature set submitted; default: this config's furthest stage that exists
    stat: str = "mean"
    gzip: bool = False


class Config(Section):
    name: SafeName = "experiment"
    seed: int = 42
    workdir: HomePath = "."  # where folds/, models/, features/, submissions/ go (never under competition.root)
    competition: Competition = Competition()
    folds: Folds = Folds()
    data: Data = Data()
    model: Model = Model()
    train: Train = Train()
    lr_find: LrFind = LrFind()
    pretrain: Pretrain = Pretrain()
    features: Features = Features()
    knn: Knn = Knn()
    stack: Stack = Stack()
    postprocess: Postprocess = Postprocess()
    leaderboard: Leaderboard = Leaderboard()
    submit: Submit = Submit()
    kaggle: Kaggle = Kaggle()
    tune: Tune = Tune()

    def updated(self, values: dict[str, Any], where: str = "config") -> Config:
        """A new, validated config with each dotted key set (``cfg.updated({"folds.seed": 7})``): the one
        way code derives a config from another, so every derived config is checked like a loaded one."""
        return validate(with_values(self, values), where=where)

    @model_validator(mode="after")
    def _loss_fits_head(self):
        from pipeline.training.losses import LOSSES

        kind = TASKS[self.competition.task].head
        allowed = ["auto", *LOSSES[kind]]
        if self.train.loss not in allowed:
            raise ValueError(f"train.loss '{self.train.loss}' does not apply to a {kind} head (task "
                             f"'{self.competition.task}'); allowed: {', '.join(allowed)}")
        if self.train.class_weights is not None and not HEAD_KINDS[kind].classes:
            raise ValueError(f"train.class_weights: a {kind} head (task '{self.competition.task}') has no classes to "
                             "weight; remove it (classes are weighted for multiclass and binary heads)")
        return self

    @model_validator(mode="after")
    def _schedule_uses_its_options(self):
        t = self.train
        if t.scheduler == "plateau" and t.warmup_epochs:
            raise ValueError("train.warmup_epochs: the plateau scheduler has no warm-up (it steps once per epoch on the "
                             "score); use cosine, step or none with a warm-up, or set warmup_epochs=0")
        if t.scheduler == "none" and t.min_lr_ratio:
            raise ValueError("train.min_lr_ratio: scheduler none keeps the lr constant, so there is no floor to set; "
                             "use cosine, restarts, step or plateau, or set min_lr_ratio=0")
        return self

    @model_validator(mode="after")
    def _margin_head(self):
        if self.model.head != "linear" and not get_task(self.competition.task).head_kind.margin:
            raise ValueError(f"model.head={self.model.head} needs class targets with a softmax head; "
                             f"competition.task={self.competition.task} has none: use model.head=linear")
        return self

    @model_validator(mode="after")
    def _label_column_holds_labels(self):
        task = get_task(self.competition.task)
        if task.label_sets and isinstance(self.competition.target, str) and self.competition.metric in \
                task.probability_metrics:
            raise ValueError(f"competition.metric={self.competition.metric} scores a probability per label, but "
                             f"competition.target={self.competition.target} is one column of space-separated labels, "
                             "which holds no probabilities: give the labels as 0/1 columns (competition.target: "
                             "[a, b, ...]) or use micro_f1 / macro_f1")
        return self

    @model_validator(mode="after")
    def _one_normalisation(self):
        d = self.data
        mode = ("model" if self.model.pretrained else "dataset") if d.normalize == "auto" else d.normalize
        if mode != "dataset" and (d.mean is not None or d.std is not None):
            raise ValueError(f"data.mean/data.std are used only with data.normalize=dataset; data.normalize is "
                             f"{d.normalize} ({mode}{' with model.pretrained' if d.normalize == 'auto' else ''}); "
                             "set data.normalize=dataset to use them, or remove them")
        return self


_TYPE_TAGS = {"int", "str", "float", "bool", "none"}


def _explain(exc: ValidationError, where: str) -> str:
    """One line per bad key: ``key = value: what is wrong`` (a union's alternatives joined by 'or')."""
    by_key: dict[str, tuple] = {}
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not any(c in str(p) for c in "[-") and str(p) not in _TYPE_TAGS)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "value_error" and (not loc or msg.startswith(loc + ".")):
            by_key[msg] = (None, [msg])  # a check across keys: its message names them
            continue
        value, msgs = by_key.get(loc, (err.get("input"), []))
        by_key[loc] = (value, msgs + [msg])
    lines = []
    for key, (value, msgs) in by_key.items():
        text = " or ".join(dict.fromkeys(m[0].lower() + m[1:] if i else m for i, m in enumerate(msgs)))
        if value is None and msgs == [key]:
            lines.append(key)
        elif isinstance(value, dict):
            lines.append(f"{key}: {text}")
        else:
            lines.append(f"{key} = {value!r}: {text}")
    head = f"{where}: invalid config value" + ("s" if len(lines) > 1 else "")
    return head + ": " + "; ".join(lines)


def validate(cfg: dict | Config, where: str = "config") -> Config:
    """The config checked against the schema (types coerced, e.g. '3' -> 3), as the frozen ``Config``
    every stage receives, or a ConfigError naming every bad key, its value and what is allowed."""
    if isinstance(cfg, Config):
        return cfg
    try:
        return Config.model_validate(cfg)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, where)) from None


def with_values(cfg: dict | Config, values: dict[str, Any]) -> dict:
    """The config as a plain dict with each dotted key (``"folds.seed"``) set to its value, not yet
    validated (``validate`` it, or use ``Config.updated``)."""
    out = cfg.model_dump() if isinstance(cfg, Config) else copy.deepcopy(cfg)
    for key, value in values.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


DEFAULTS: dict[str, Any] = Config().model_dump()
