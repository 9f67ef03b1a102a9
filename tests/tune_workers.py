"""Shared by the tune tests (SQLite and PostgreSQL): a tiny tuning config and `tune` worker processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import make_competition, tiny_cfg

from pipeline.store.io import dump_yaml

# logloss (continuous, no ties): lr 1e-7 barely moves from the initial loss, the enqueued good rates do;
# the baseline (train.lr 0.003) and 0.005 run first, so a later 1e-7 trial meets a completed one and is pruned
SPACE = ["competition.metric=logloss", "tune.startup_trials=1",
         "tune.params.train.lr={low: 1.0e-7, high: 1.0e-2, log: true}",
         "tune.enqueue=[{train.lr: 0.005}, {train.lr: 1.0e-7}, {train.lr: 2.0e-7}]"]


def tune_config(tmp_path: Path, *overrides: str) -> Path:
    """A tiny competition with its folds, and a config file for `python -m pipeline tune -c`."""
    root = make_competition(tmp_path / "comp", n=90, n_groups=12, n_classes=3, size=16)
    cfg = tiny_cfg(root, *SPACE, *overrides)
    path = tmp_path / "tune.yaml"
    path.write_text(dump_yaml(cfg))
    return path


def worker(cfg_path: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    """One `tune` worker process (one thread, output to a log beside the config)."""
    log = open(cfg_path.with_name(f"worker-{len(list(cfg_path.parent.glob('worker-*.log')))}.log"), "w")
    return subprocess.Popen([sys.executable, "-m", "pipeline", "tune", "-c", str(cfg_path), *overrides],
                            cwd=cfg_path.parent, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def logs(cfg_path: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(cfg_path.parent.glob("worker-*.log")))


def trials(storage: str, study: str = "tiny"):
    import optuna

    return sorted(optuna.load_study(study_name=study, storage=storage).get_trials(), key=lambda t: t.number)


def tune_rows(lb) -> list[tuple]:
    """(trial, experiment) of every `tune` row of a leaderboard (path or URL)."""
    from pipeline.store import leaderboard as LB

    with LB.connect(lb) as con:
        return sorted(tuple(r) for r in con.execute("SELECT trial, experiment FROM runs WHERE stage='tune'").fetchall())
