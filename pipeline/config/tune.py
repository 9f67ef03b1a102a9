"""The ``tune:`` section of the typed config: the search space and how the study runs.

    tune:
      trials: 20                # in total, over every worker sharing the study
      folds: 0                  # the fold(s) a trial trains on; `all` = the full CV
      pruner: median            # median | hyperband | none (per-epoch validation scores)
      storage: null             # Optuna RDB URL; default sqlite:///<workdir>/tune/<study>/study.db
      params:
        train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}      # float (log scale)
        train.weight_decay: {low: 0.0, high: 1.0e-3}          # float (linear)
        train.epochs: {type: int, low: 3, high: 8}            # int
        model.pool: {choices: [avg, gem]}                      # categorical

A parameter's ``type`` is inferred when left out: ``choices`` -> categorical, integer bounds -> int,
else float. Keys may also be nested (``params: {train: {lr: {...}}}``), so ``key=value`` overrides such
as ``tune.params.train.lr.high=0.1`` work. The shape of each parameter is checked here, at load time;
that each key exists and each bound is an allowed value of it is checked by ``pipeline.stages.tune`` before
any trial trains.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.types import Section

SPEC_KEYS = {"type", "low", "high", "log", "step", "choices"}


class TuneParam(Section):
    type: Literal["float", "int", "categorical"] | None = None  # None: inferred from the other fields
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False  # sample on a log scale (low must be > 0)
    step: int | float | None = Field(None, gt=0)  # discretisation step (not with log)
    choices: list[Any] | None = None  # categorical values: numbers, strings, booleans or null

    @model_validator(mode="after")
    def _shape(self):
        kind = self.type or ("categorical" if self.choices is not None else
                             "int" if all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high))
                             else "float")
        object.__setattr__(self, "type", kind)
        if kind == "categorical":
            if not self.choices:
                raise ValueError("an empty categorical: list at least one value in choices, e.g. choices: [avg, gem]")
            bad = [c for c in self.choices if c is not None and not isinstance(c, (bool, int, float, str))]
            if bad:
                raise ValueError(f"choices must be numbers, strings, booleans or null; got {bad[0]!r}")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("a categorical takes only choices (no low, high, log or step)")
            return self
        if self.choices is not None:
            raise ValueError(f"a {kind} parameter takes low and high, not choices (leave out type for a categorical)")
        if self.low is None or self.high is None:
            raise ValueError(f"a {kind} parameter needs both low and high, e.g. {{low: 1.0e-4, high: 1.0e-2, log: true}}")
        if self.low > self.high:
            raise ValueError(f"low {self.low} > high {self.high}: low must be <= high")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got low {self.low}; use a positive low or log: false")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be used together")
        if kind == "int" and any(float(v) != int(v) for v in (self.low, self.high, self.step or 1)):
            raise ValueError(f"an int parameter needs integer low, high and step; got low {self.low}, high {self.high}")
        return self


def _flat(tree: dict, prefix: str = "") -> dict[str, dict]:
    """``{train: {lr: {...}}}`` and ``{"train.lr": {...}}`` alike -> ``{"train.lr": {...}}`` (merged)."""
    out: dict[str, dict] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not (set(value) & SPEC_KEYS):
            for k, v in _flat(value, path + ".").items():
                out[k] = {**out.get(k, {}), **v}
        else:
            out[path] = {**out.get(path, {}), **value} if isinstance(value, dict) else value
    return out


class Tune(Section):
    trials: int = Field(20, ge=1)  # trials in the study, over every worker that shares it
    folds: Literal["all"] | int | list[int] = 0  # the fold(s) a trial trains on; all = the full CV
    pruner: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = Field(2, ge=0)  # median: no pruning before this many trials have completed
    warmup_steps: int = Field(0, ge=0)  # median: no pruning in a trial's first N validations (epochs)
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int | None = None  # sampler seed (one worker: reproducible; several workers: leave None)
    study: str | None = None  # study name; default: the experiment name
    storage: str | None = None  # Optuna RDB URL (postgresql://, mysql://, sqlite:///); default: SQLite under workdir
    heartbeat: int = Field(30, ge=1)  # seconds between a running trial's heartbeats
    grace: int | None = Field(None, ge=1)  # a trial silent this long is marked failed; default 2 x heartbeat
    baseline: bool = True  # the first trial runs the config's own values (those inside the space)
    enqueue: list[dict[str, Any]] = []  # more trials to run first, {key: value} each
    output: str = "configs/{name}-best.yaml"  # the best config, relative to the current directory
    params: dict[str, TuneParam] = {}

    @field_validator("params", mode="before")
    @classmethod
    def _nested(cls, v):
        return _flat(v) if isinstance(v, dict) else v

    @field_validator("storage")
    @classmethod
    def _url(cls, v):
        if v is not None and not re.match(r"^[A-Za-z][\w]*(\+\w+)?://", v):
            raise ValueError("must be an RDB URL such as postgresql://user@host:5432/db or sqlite:///tune.db "
                             "(leave it null for a SQLite file under workdir)")
        return v

    @field_validator("folds")
    @classmethod
    def _folds(cls, v):
        if isinstance(v, list) and (not v or any(k < 0 for k in v)) or isinstance(v, int) and v < 0:
            raise ValueError("name a fold index (0), a list of them ([0, 2]) or all")
        return v
