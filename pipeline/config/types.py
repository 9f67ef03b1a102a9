"""Value types of the config schema, each a string checked on its own: names that become folders, paths
with ``~``, the image and init path patterns, and names of registered builders (optimizer, scheduler,
TTA set, level-2 model), checked against the registry that holds them."""
from __future__ import annotations

import os
import re
import string
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from pipeline.metrics import METRICS
from pipeline.tasks import check_task_name


class Section(BaseModel):
    """A config section: typed, checked, and frozen once validated (a stage cannot splice another's keys
    into it: ``Config.updated`` makes a new, re-validated config). Read by attribute (``cfg.train.lr``);
    ``cfg["train"]["lr"]``, ``.get`` and ``{**section}`` still read, for notebooks and helpers written
    against the old dict config (the package's own code reads attributes: tests/test_architecture.py)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    def __getitem__(self, key: str):
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key) if key in type(self).model_fields else default

    def __contains__(self, key: object) -> bool:
        return key in type(self).model_fields

    def keys(self):  # (with __getitem__: ``{**cfg.data, "cache": False}`` and ``dict(cfg.data)`` read the fields)
        return type(self).model_fields.keys()


def _safe_name(v):
    """A name that becomes a folder or file name (models/<name>/, features/<name>/): one path component."""
    if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=@-]*", str(v)):
        raise ValueError("must be one folder name: letters, digits and . _ + = @ - (not starting with a dot, no "
                         "'/' or '..'), since outputs go to models/<name>/, features/<name>/")
    return v


def _home(v):
    """``~`` and ``~user`` mean the home folder, as in a shell (no folder named '~' is ever made)."""
    return os.path.expanduser(v) if isinstance(v, str) else v


def _placeholders(v: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]


def _image_pattern(v: str | None):
    """An image path pattern knows the placeholders {id} (required: else every row is one image) and {split}
    (train or test: ``{split}_images/{id}.jpg``)."""
    if v is None:
        return v
    names = _placeholders(v)
    unknown = [n for n in names if n not in ("id", "split")]
    if unknown:
        raise ValueError(f"knows only the placeholders {{id}} and {{split}}, not "
                         f"{', '.join('{' + n + '}' for n in unknown)} (e.g. images/{{id}}.png)")
    if "id" not in names:
        raise ValueError("must contain {id} (e.g. images/{id}.png); without it every row points at one image")
    return v


def _init_pattern(v: str):
    unknown = [n for n in _placeholders(v) if n != "fold"]
    if unknown:
        raise ValueError(f"knows only the placeholder {{fold}} (each fold's own file, e.g. "
                         f"models/a/fold{{fold}}/best.pt), not {', '.join('{' + n + '}' for n in unknown)}")
    return _home(v)


SafeName = Annotated[str, AfterValidator(_safe_name)]
HomePath = Annotated[str, AfterValidator(_home)]


def _optimizer(v: str) -> str:
    from pipeline.training.optim import OPTIMIZERS

    return OPTIMIZERS.check(v)


def _scheduler(v: str) -> str:
    from pipeline.training.optim import SCHEDULERS

    return SCHEDULERS.check(v)


def _tta_set(v: str) -> str:
    from pipeline.predict.tta import TTA_SETS

    return TTA_SETS.check(v)


def _level2(v: str) -> str:
    from pipeline.level2.models import LEVEL2_MODELS

    return LEVEL2_MODELS.check(v)


Optimizer = Annotated[str, AfterValidator(_optimizer)]
Scheduler = Annotated[str, AfterValidator(_scheduler)]


ImagePattern = Annotated[str, AfterValidator(_image_pattern)]
InitPath = Annotated[str, AfterValidator(_init_pattern)]
TtaSet = Annotated[str, AfterValidator(_tta_set)]
Level2Model = Annotated[str, AfterValidator(_level2)]
TaskName = Annotated[str, AfterValidator(check_task_name)]  # a kind of pipeline/tasks.py


def _metric(v: str) -> str:
    if v not in METRICS:
        raise ValueError(f"unknown value; allowed: {', '.join(METRICS)}")
    return v


MetricName = Annotated[str, AfterValidator(_metric)]


def _pool(v: str) -> str:
    from pipeline.training.models import POOLS

    return POOLS.check(v)


PoolName = Annotated[str, AfterValidator(_pool)]
