"""Task kinds and head kinds: the one place that knows what each kind of target means.

A **task** (``competition.task``) is what the competition asks for. It owns the kind of its main head, the
metrics that score it, how folds are stratified, which post-processing rules apply, what level 2 fits,
and how the submission column is written. A **head kind** is what a network output is: its activation,
its default loss (the losses themselves are registered per head kind in ``training.losses``), whether its
targets are class indices, and how many outputs it has. Auxiliary heads and the jigsaw puzzle use head
kinds directly.

Adding a task kind is one ``Task`` entry here (plus a head kind if it needs a new output). Everything else
asks this table: a test fails if a task name is compared anywhere else in the package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config.schema import Config


@dataclass(frozen=True)
class HeadKind:
    name: str
    activation: str  # softmax | sigmoid | sigmoids | value | values | grid_softmax (models.activate)
    default_loss: str  # train.loss=auto
    classes: bool  # targets are class indices 0..K-1 (class weights, one-hot mixing, label smoothing)
    outputs: str  # how many outputs: "classes" (K) | "one" | "columns" (one per target column)
    soft_targets: bool = False  # learns from class probabilities: pseudo-labels and distillation
    margin: bool = False  # may be a cosine head trained with an angular margin (model.head: arcface | cosface)

    @property
    def probabilities(self) -> bool:
        """Its outputs are probabilities (of classes or of labels): their squared error is a Brier score."""
        return self.activation in ("softmax", "sigmoid", "sigmoids")

    def n_outputs(self, n_classes: int | None, columns: list) -> int:
        return {"classes": int(n_classes or 0), "one": 1, "columns": len(columns)}[self.outputs]

    def n_weights(self, n_outputs: int) -> int:
        """Entries of a class-weight vector: a binary head weighs its 2 classes through 1 output."""
        return 2 if self.name == "binary" else n_outputs


HEAD_KINDS = {h.name: h for h in (
    HeadKind("multiclass", "softmax", "ce", True, "classes", soft_targets=True, margin=True),
    HeadKind("binary", "sigmoid", "bce", True, "one"),
    HeadKind("regression", "value", "mse", False, "one"),
    HeadKind("vector", "values", "mse", False, "columns"),  # several values regressed together
    HeadKind("multilabel", "sigmoids", "bce", False, "columns", soft_targets=True),  # a yes/no per label
    HeadKind("position", "grid_softmax", "ce", True, "classes"),  # the jigsaw: a tile's position per tile
)}


@dataclass(frozen=True)
class Task:
    name: str
    head: str  # the main target's head kind
    metrics: tuple[str, ...]  # the competition metrics that apply
    classes: bool  # labels are classes: integer (or string) labels, stratified folds, class probability columns
    rules: tuple[str, ...]  # the postprocess rules that apply (postprocess.<rule>)
    level2: str  # what a level-2 model fits: multiclass | binary | regression
    submission: str  # label (argmax, mapped back to the original labels) | value | rounded (integer values)
    probability_metrics: tuple[str, ...] = ()  # metrics scored on probabilities: submit writes them, not labels
    stratify: str | None = None  # how folds stratify: classes | bins (quantiles of a value) | labels (label
    # sets); None: classes when labels are classes, else bins

    def __post_init__(self):
        if self.stratify is None:
            object.__setattr__(self, "stratify", "classes" if self.classes else "bins")

    @property
    def label_sets(self) -> bool:
        """The target is a set of labels per row (one 0/1 column per label; or one column of space-separated
        labels, expanded on loading and written back by submit)."""
        return self.stratify == "labels"

    @property
    def head_kind(self) -> HeadKind:
        return HEAD_KINDS[self.head]

    def submits_labels(self, metric: str) -> bool:
        return self.submission in ("label", "labels") and metric not in self.probability_metrics


TASKS = {t.name: t for t in (
    Task("multiclass", "multiclass", ("accuracy", "macro_f1", "logloss", "qwk"), True, ("class_scale",),
         "multiclass", "label"),  # (logloss submits probability columns: submission.class_columns)
    Task("binary", "binary", ("accuracy", "macro_f1", "logloss", "auc"), True, ("threshold",), "binary", "label",
         probability_metrics=("auc", "logloss")),
    Task("regression", "regression", ("rmse", "mae", "qwk"), False, ("rounding", "clip"), "regression", "value"),
    # an ordered class label regressed as one value; submitted rounded when the sample's column is integer
    Task("ordinal", "regression", ("accuracy", "macro_f1", "rmse", "mae", "qwk"), True, ("rounding", "clip"),
         "regression", "rounded"),
    # any number of labels per row; submitted as the competition writes them: 0/1 (or probability) columns,
    # or one column of space-separated labels
    Task("multilabel", "multilabel", ("micro_f1", "macro_f1", "map", "mean_auc", "logloss"), False,
         ("label_thresholds",), "multilabel", "labels", probability_metrics=("map", "mean_auc", "logloss"),
         stratify="labels"),
)}


def check_task_name(name: str) -> str:
    """For the config schema: a task kind's name, or a ValueError listing the kinds."""
    if name not in TASKS:
        raise ValueError(f"'{name}' is not a task kind; kinds: {', '.join(TASKS)}")
    return name


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"competition.task '{name}' is not a task kind; kinds: {', '.join(TASKS)}")
    return TASKS[name]


def task_of(cfg: Config) -> Task:
    return get_task(cfg.competition.task)


def head_kind(name: str) -> HeadKind:
    return HEAD_KINDS[name]


def head_kind_for(task_or_kind: str, where: str) -> HeadKind:
    """The head kind of a task (``ordinal`` -> regression) or a head kind named directly (``vector``)."""
    if task_or_kind in TASKS:
        return TASKS[task_or_kind].head_kind
    if task_or_kind in HEAD_KINDS:
        return HEAD_KINDS[task_or_kind]
    raise ConfigError(f"{where}: unknown task '{task_or_kind}' ({', '.join([*TASKS, *HEAD_KINDS])})")
