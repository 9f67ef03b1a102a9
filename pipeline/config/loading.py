"""Experiment configuration: defaults, YAML files, ``key=value`` overrides, hashing.

A config is a nested dict checked against the typed schema (``pipeline.config.schema``) before any work:
a key that does not exist is refused with the closest known names, a bad value with the allowed ones.
A YAML file may name ``base: other.yaml`` (relative to itself) to inherit from it.
"""
from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.schema import DEFAULTS, Config, with_values
from pipeline.config.schema import validate as _validate_schema
from pipeline.errors import ConfigError
from pipeline.store.io import config_hash, dump_yaml  # noqa: F401  (re-exported: the config's hash and YAML form)


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


def _int(loader, node):
    """YAML 1.1 reads ``010`` as octal 8; a competitor who writes epochs: 010 means ten (YAML 1.2 agrees)."""
    raw = loader.construct_scalar(node).replace("_", "")
    if re.fullmatch(r"[-+]?0[0-9]+", raw):
        return int(raw, 10)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


def _mapping(loader, node, deep=False):
    """A key given twice in one mapping is refused (YAML would keep the last one silently)."""
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                "keep one", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor("tag:yaml.org,2002:int", _int)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                        lambda loader, node: _mapping(loader, node, deep=True))


def yaml_error(exc: Exception) -> str:
    """A YAML error as one line (PyYAML's messages span several, with a caret drawing)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not set(ln.strip()) <= {"^"}]
    return "; ".join(ln for ln in lines if not ln.startswith('in "<unicode string>"') and not ln.startswith("in '"))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


# Keys whose value is a free-form mapping (user-chosen sub-keys are allowed there).
FREE_FORM = {
    "train.loss_weights",
    "train.optimizer_args",
    "train.scheduler_args",
    "stack.lgbm",
    "tune.params",  # the search space: {dotted config key: {low, high, log, step | choices}}
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


# names other tools use for our keys (the last component of a dotted key)
ALIASES = {"learning_rate": "lr", "num_epochs": "epochs", "n_epochs": "epochs", "max_epochs": "epochs", "bs": "batch_size",
           "n_folds": "n_splits", "num_folds": "n_splits", "nfolds": "n_splits", "arch": "backbone", "model_name": "backbone",
           "img_size": "image_size", "size": "image_size", "wd": "weight_decay", "tta_set": "tta"}


def _suggest(key: str) -> str:
    last = key.rsplit(".", 1)[-1]
    alias = [k for k in known_keys() if k.rsplit(".", 1)[-1] == ALIASES.get(last)]
    if alias:
        return f" Did you mean: {', '.join(sorted(alias, key=lambda k: k.split('.')[0] != key.split('.')[0]))}?"
    close = difflib.get_close_matches(key, known_keys(), n=3, cutoff=0.5)
    if not close:
        # also match on the last component alone (e.g. "epoch" typed for "epochs")
        close = [k for k in known_keys() if difflib.SequenceMatcher(None, k.rsplit(".", 1)[-1], last).ratio() > 0.7][:3]
    return f" Did you mean: {', '.join(close)}?" if close else " See pipeline/config/schema.py for the known keys."


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
        raise ConfigError(f"config file '{path}' is not valid YAML: {yaml_error(exc)}") from None
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
        raise ConfigError(f"override '{text}' must look like key=value, e.g. train.epochs=3 (a value with spaces, "
                          "e.g. a list: quote it whole, \"train.folds=[0, 1]\").")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        hint = (f"quote it whole, e.g. \"{key}=[0, 1]\" (the shell splits a list at its spaces)"
                if raw.lstrip()[:1] in "[{" else "check its quotes: every opening quote needs its closing one")
        raise ConfigError(f"override '{text}': the value is not valid YAML ({yaml_error(exc)}); {hint}") from None
    return key, value


def is_override(arg: str) -> bool:
    """Whether a command-line word is a ``key=value`` config override (its key is a config key), not
    free text that happens to hold '=' (a leaderboard note, a pattern)."""
    if "=" not in arg or arg.startswith("-"):
        return False
    key = arg.split("=", 1)[0].strip()
    return key in set(known_keys()) or any(key.startswith(f + ".") for f in FREE_FORM)


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
        cfg = with_values(cfg, {key: value})
    return cfg


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults <- YAML file (with its ``base`` chain) <- ``key=value`` overrides, validated: the frozen
    ``Config`` every stage receives (``cfg.train.lr``; ``cfg.updated({...})`` derives another)."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(Path(path)), where=str(path))
    overrides = list(overrides)
    cfg = apply_overrides(cfg, overrides)
    where = " + ".join(([str(path)] if path is not None else []) + (["command line"] if overrides else [])) or "config"
    return _validate_schema(cfg, where=where)


def knn_config(experiment: str, config_path: str | Path, cfg: dict) -> str | None:
    """The config whose ``make knn`` writes the feature set ``experiment`` (its ``knn.name``, by default
    ``<name>-knn``), or None when ``experiment`` is no kNN set: the given config, a YAML beside it, or the
    config an earlier ``make knn`` saved beside it."""
    def knn_name(data: dict) -> str | None:
        return (data.get("knn") or {}).get("name") or (f"{data['name']}-knn" if data.get("name") else None)

    if cfg["name"] == experiment:
        return None
    if knn_name(cfg) == experiment:
        return str(config_path)
    found = []
    for candidate in sorted(Path(config_path).parent.glob("*.y*ml")):
        try:
            data = _read_yaml(candidate)
        except ConfigError:
            continue
        if data.get("name") == experiment:  # an experiment of that very name: its features
            return None
        if knn_name(data) == experiment:
            found.append(str(candidate))
    if found:
        return found[0]
    from pipeline.store.paths import features_dir

    meta = features_dir(cfg, experiment) / "meta.json"
    if meta.exists() and json.loads(meta.read_text()).get("stage") == "knn":
        return str(features_dir(cfg, experiment) / "config.yaml")
    return None


def config_for_experiment(experiment: str, config_path: str | Path, cfg: dict) -> str:
    """The config file that defines ``experiment`` (for Make to bring its features up to date):
    the given config itself when it names it; else a YAML beside it whose ``name`` is it (the naming
    rule); else the resolved config saved beside its features or models by an earlier run."""
    if cfg["name"] == experiment:
        return str(config_path)
    folder = Path(config_path).parent
    for candidate in sorted(folder.glob("*.y*ml")):
        try:
            data = _read_yaml(candidate)
        except ConfigError:
            continue
        if data.get("name") == experiment:
            return str(candidate)
    from pipeline.store.paths import features_dir, models_dir, stack_inputs  # noqa: F401

    for saved in (features_dir(cfg, experiment) / "config.yaml", models_dir(cfg, experiment) / "config.yaml"):
        if saved.exists():
            return str(saved)
    raise ConfigError(f"stack.experiments names '{experiment}', but no config in {folder}/ has `name: {experiment}` "
                      f"and no earlier run saved one; build its features first with "
                      f"`make features CONFIG=<its config>`, or add that config to {folder}/.")
