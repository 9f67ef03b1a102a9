"""Experiment configuration: defaults, YAML files, ``key=value`` overrides, hashing.

A config is a nested dict. Every key that may appear is declared in ``DEFAULTS``; a YAML file or a
command-line override naming a key that does not exist is refused with the closest known names.
A YAML file may name ``base: other.yaml`` (relative to itself) to inherit from it.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; competitors write learning rates that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what to change."""


# Keys whose value is a free-form mapping (user-chosen sub-keys are allowed there).
FREE_FORM = {
    "train.loss_weights",
    "train.optimizer_args",
    "stack.lgbm",
}

DEFAULTS: dict[str, Any] = {
    "name": "experiment",
    "seed": 42,
    "competition": {
        "name": "demo",
        "root": "data/demo",
        "train": "train.csv",
        "test": "test.csv",
        "sample_submission": "sample_submission.csv",
        "solution": "solution.csv",
        "image": "images/{id}.png",
        "id": "id",
        "target": "target",
        "task": "multiclass",  # binary | multiclass | regression | ordinal
        "num_classes": None,  # inferred from train.csv when None (classification tasks)
        "metric": "accuracy",
        "group": None,
        "tabular": [],
        "categorical": [],
        "aux_targets": [],
        "check_images": True,
    },
    "folds": {
        "file": "folds/{competition}.csv",
        "method": "auto",  # auto | stratified_group | stratified | group | kfold
        "n_splits": 5,
        "seed": 42,
        "bins": 10,  # quantile bins used to stratify a continuous target
        "balance": False,  # move whole groups (or rows) so fold sizes match
        "search": 1,  # try this many seeds and keep the best-stratified split
    },
    "data": {
        "in_chans": 3,
        "image_size": 32,
        "mean": None,  # per-channel; None = (0.5,)*in_chans
        "std": None,
        "cache": False,
        "num_workers": 0,
    },
    "model": {
        "backbone": "resnet18",
        "init": None,  # local weights file (our jigsaw pretraining or a user's), never a download
        "pool": "avg",  # avg | gem | avgmax
        "bnneck": False,
        "dropout": 0.0,
        "freeze_stages": 0,  # freeze the stem and the first N stages for the whole run
    },
    "train": {
        "epochs": 5,
        "batch_size": 64,
        "optimizer": "adam",  # adam | adamw | sgd
        "lr": 3e-4,
        "weight_decay": 0.0,
        "momentum": 0.9,
        "optimizer_args": {},
        "backbone_lr_mult": 1.0,  # discriminative lr: backbone lr = lr * this
        "freeze_backbone_epochs": 0,  # train the heads only for this many epochs, then unfreeze
        "scheduler": "cosine",  # cosine | restarts | step | plateau | none
        "warmup_epochs": 0,
        "min_lr_ratio": 0.0,
        "cycle_epochs": 0,  # restarts: epochs per cosine cycle; a snapshot is saved at each cycle end
        "milestones": [],
        "gamma": 0.1,
        "patience": 2,  # plateau: epochs without improvement before the lr is cut by gamma
        "loss": "auto",  # auto | ce | focal | bce | mse | rmse | mae | smoothl1 (main target heads)
        "label_smoothing": 0.0,
        "class_weights": None,  # list of per-class weights for ce/focal, or "balanced"
        "focal_gamma": 2.0,
        "ohem": 1.0,  # top-k loss: keep this fraction of the hardest samples of each batch
        "loss_weights": {},
        "grad_clip": 0.0,
        "accumulate": 1,
        "amp": True,  # only on CUDA: bf16 where supported, else fp16 with a grad scaler
        "channels_last": False,
        "ema": False,
        "ema_decay": 0.999,
        "swa": False,
        "swa_start": 0.75,  # fraction of the epochs after which weights are averaged
        "multiscale": [],  # e.g. [24, 32, 40]: a random input size per batch
        "sync_bn": False,  # under torchrun: SyncBatchNorm across processes
        "mixup": 0.0,  # alpha; 0 = off
        "cutmix": 0.0,
        "mix_prob": 0.5,
        "mix_off_epoch": None,
        "early_stopping": 0,  # patience in epochs; 0 = off
        "folds": None,  # subset of folds to train, e.g. [0, 2]
        "full": False,  # also train one model on all rows
        "device": "auto",
        "augment": [],  # albumentations transforms: [{HorizontalFlip: {p: 0.5}}, ...]
        "deterministic": True,
        "log_every": 0,
    },
    "lr_find": {
        "start": 1e-7,
        "end": 1.0,
        "steps": 100,
        "smoothing": 0.9,  # exponential smoothing of the loss curve
        "diverge": 4.0,  # stop once the smoothed loss exceeds this multiple of its minimum
    },
    "pretrain": {
        "formulation": "position",  # position (which tile is at each of the 9 places) | permutation (1 of N)
        "grid": 3,
        "n_permutations": 100,  # permutation formulation: chosen for maximal Hamming distance
        "gap": 2,  # pixels dropped between tiles, with random jitter in training (no edge-continuity shortcut)
        "tile_norm": True,  # normalise every tile on its own (no brightness shortcut)
        "dihedral": True,  # random flip/rotation (the 8 D4 views) of each image as extra inputs
        "epochs": 5,
        "batch_size": 128,
        "lr": 1e-3,
        "optimizer": "adam",
        "scheduler": "cosine",
        "valid_fraction": 0.05,  # held-out images for the puzzle accuracy
        "max_images": 0,  # 0 = every train and test image
        "init": None,  # continue from a local weights file
        "output": "models/pretrain/{name}-{backbone}.pt",
    },
    "features": {
        "tta": "none",  # none | hflip | vflip | flip | d4 (ttach view sets; identity first)
        "scales": [1.0],  # multi-scale TTA: input scale factors, e.g. [0.875, 1.0, 1.125]
        "stats": ["mean", "var", "max", "min"],
        "keep_views": False,
        "batch_size": 256,
        "embedding": False,  # also dump the pooled backbone embedding (identity view)
        "pca": 0,  # reduce it to this many components, PCA fitted inside each fold on its train rows
        "use_full": False,
    },
    "stack": {
        "name": None,  # output feature set; default: the experiment name (+ "-l2" if it is also an input)
        "experiments": [],  # level-1 experiments to stack; default: this config's own experiment
        "model": "lgbm",  # lgbm | linear | weighted
        "stat": "mean",  # weighted: which per-view statistic (or view, e.g. v0) of each experiment to blend
        "use_tabular": True,
        "test_mode": "mean",  # mean | refit
        "refit_coef": 1.0,
        "lgbm": {},
    },
    "postprocess": {
        "source": None,  # feature set to post-process; default: this config's level 2, else its level 1
        "name": None,  # output feature set; default: <source>-pp
        "blend_with": None,  # a level-1 experiment to blend with (the atmaCup11 author used 0.5)
        "blend_weight": None,  # fixed weight of the source in the blend; None = tuned on OOF
        "force_from": None,  # {experiment: x, head: y}: force class i when that head's probability > t
        "force_threshold": None,  # fixed t (the author used 0.94); None = tuned on OOF
        "class_scale": False,  # per-class probability multipliers (multiclass)
        "threshold": False,  # decision threshold (binary)
        "rounding": False,  # optimised rounding thresholds (ordinal / regression, e.g. QWK)
        "clip": False,  # true = clip to the train target's range, or [lo, hi]
    },
    "leaderboard": {
        "enabled": True,
        "path": "submissions/leaderboard.db",
        "mlflow": False,  # also log to MLflow when the package is installed
        "mlflow_uri": None,  # default: a local file store, file:./mlruns
    },
    "submit": {
        "source": None,  # feature set whose test predictions are submitted; default: this config's
        # level-2 output when it exists, else its level-1 experiment
        "stat": "mean",
        "gzip": False,
    },
}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in FREE_FORM:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def known_keys() -> list[str]:
    return sorted(_flatten(DEFAULTS))


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, known_keys(), n=3, cutoff=0.5)
    if not close:
        # also match on the last component alone (e.g. "lr" typed as "learning_rate")
        last = key.rsplit(".", 1)[-1]
        close = [k for k in known_keys() if difflib.SequenceMatcher(None, k.rsplit(".", 1)[-1], last).ratio() > 0.7][:3]
    return f" Did you mean: {', '.join(close)}?" if close else " See pipeline/config.py DEFAULTS for the known keys."


def _merge(base: dict, update: dict, where: str, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"{where}: unknown config key '{path}'.{_suggest(path)}")
        if isinstance(base[key], dict) and path not in FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{path}' must be a mapping, got {value!r}.")
            out[key] = _merge(base[key], value, where, path + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist; pass an existing file with -c (see configs/).")
    if path.resolve() in seen:
        raise ConfigError(f"config file '{path}' inherits from itself through 'base'.")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}.")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = _read_yaml((path.parent / base), seen + (path.resolve(),))
    return _deep_update(parent, data)


def _deep_update(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. train.epochs=3.")
    key, raw = text.split("=", 1)
    key = key.strip()
    value = yaml_load(raw) if raw.strip() else None
    return key, value


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    cfg = copy.deepcopy(cfg)
    flat_known = set(known_keys())
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        # allow overrides inside free-form mappings, e.g. stack.lgbm.num_leaves=15
        free_parent = next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in FREE_FORM), None)
        if key not in flat_known and free_parent is None:
            raise ConfigError(f"command line: unknown config key '{key}'.{_suggest(key)}")
        node = cfg
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return cfg


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """Defaults <- YAML file (with its ``base`` chain) <- ``key=value`` overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(Path(path)), where=str(path))
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


TASKS = ("binary", "multiclass", "regression", "ordinal")


def validate(cfg: dict) -> None:
    comp = cfg["competition"]
    if comp["task"] not in TASKS:
        raise ConfigError(f"competition.task must be one of {', '.join(TASKS)}, got '{comp['task']}'.")
    from .metrics import METRICS

    if comp["metric"] not in METRICS:
        raise ConfigError(f"competition.metric '{comp['metric']}' is unknown; choose one of {', '.join(sorted(METRICS))}.")
    methods = ("auto", "stratified_group", "stratified", "group", "kfold")
    if cfg["folds"]["method"] not in methods:
        raise ConfigError(f"folds.method must be one of {', '.join(methods)}, got '{cfg['folds']['method']}'.")
    n = cfg["folds"]["n_splits"]
    if not isinstance(n, int) or n < 2:
        raise ConfigError(f"folds.n_splits must be an integer >= 2, got {n!r}.")


def targets(cfg: dict) -> list[str]:
    t = cfg["competition"]["target"]
    return [t] if isinstance(t, str) else list(t)


def stack_inputs(cfg: dict) -> list[str]:
    return list(cfg["stack"]["experiments"] or [cfg["name"]])


def stack_name(cfg: dict) -> str:
    """Name of the level-2 feature set a config's stack stage writes (features/<name>/)."""
    if cfg["stack"]["name"]:
        return cfg["stack"]["name"]
    return cfg["name"] + "-l2" if cfg["name"] in stack_inputs(cfg) else cfg["name"]


def config_hash(obj: Any) -> str:
    """Stable short hash of a (sub-)config: canonical JSON, sorted keys."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def dump_yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
