"""The stages by name, and ``run_stage`` to run one in-process (a notebook, a script, the CLI).

    from pipeline import load_config, run_stage
    cfg = load_config("configs/demo.yaml", ["workdir=/kaggle/working"])
    run_stage("features", cfg)

Each stage is a module with one entry point ``run(cfg, force=False)``; stages never import each
other, they meet only through the files they write (see ``pipeline.store.paths``).
"""
from __future__ import annotations

import importlib

from pipeline.config.schema import validate
from pipeline.errors import ConfigError

# stage name -> module holding its ``run(cfg, force=...)`` entry point, in chain order
STAGES = {
    "data": "data",
    "folds": "folds",
    "pretrain": "pretrain",
    "train": "train",
    "lr-find": "lr_find",
    "tune": "tune",  # Optuna search: trials run the train stage through run_stage
    "features": "features",
    "knn": "knn",  # nearest-neighbour class scores from the fold models' embeddings (metric learning)
    "stack": "stack",
    "postprocess": "postprocess",
    "submit": "submit",
    "kaggle": "kaggle",  # an offline bundle + inference notebook for a Kaggle dataset (pipeline.kaggle.inference runs it)
}


def run_stage(stage: str, cfg, force: bool = False, **options):
    """Run one stage on a resolved config (``load_config``: a ``Config``; a plain dict is validated first);
    returns what the stage returns (its output path, or the training summary). ``options`` go to the stage's
    ``run`` (``train``: ``on_epoch``, the callbacks the tune stage reports each validated epoch through)."""
    module = _module(stage)
    cfg = validate(cfg, where=f"{stage} config")  # a stage receives the frozen, typed Config (a dict is checked here)
    if stage not in ("data",):
        from pipeline.store import leaderboard

        leaderboard.check(cfg)
    return module.run(cfg, force=force, **options)


def stage_up_to_date(stage: str, cfg) -> bool:
    """Whether running the stage would do nothing. A stage that cannot tell cheaply (no ``up_to_date``)
    answers False: running it is then the way to find out."""
    check = getattr(_module(stage), "up_to_date", None)
    return bool(check and check(validate(cfg)))


def _module(stage: str):
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}.")
    return importlib.import_module(f"pipeline.stages.{STAGES[stage]}")
