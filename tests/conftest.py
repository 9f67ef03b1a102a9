"""Tiny generated competitions for fast stage tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config.loading import load_config


def make_competition(root: Path, n: int = 200, n_groups: int = 20, n_classes: int = 4, task: str = "multiclass",
                     size: int = 16, images: bool = True, seed: int = 0, group_sizes=None) -> Path:
    """Write train/test/sample_submission/solution CSVs and small PNGs whose content depends on the label."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    if group_sizes is not None:
        groups = np.concatenate([[g] * s for g, s in enumerate(group_sizes)])
        n = len(groups)
    else:
        groups = rng.integers(0, n_groups, n)
    if task == "regression":
        y = rng.normal(size=n)
    else:
        y = rng.integers(0, n_classes, n)
    ids = [f"r{i:05d}" for i in range(n)]
    train = pd.DataFrame({"id": ids, "target": y, "grp": groups, "tab": rng.normal(size=n)})
    n_test = max(n // 4, 8)
    tids = [f"t{i:05d}" for i in range(n_test)]
    ty = rng.integers(0, n_classes, n_test) if task != "regression" else rng.normal(size=n_test)
    test = pd.DataFrame({"id": tids, "grp": rng.integers(0, n_groups, n_test), "tab": rng.normal(size=n_test)})
    train.to_csv(root / "train.csv", index=False)
    test.to_csv(root / "test.csv", index=False)
    pd.DataFrame({"id": tids, "target": 0}).to_csv(root / "sample_submission.csv", index=False)
    pd.DataFrame({"id": tids, "target": ty, "Usage": np.where(np.arange(n_test) % 2, "Public", "Private")}
                 ).to_csv(root / "solution.csv", index=False)
    if images:
        (root / "images").mkdir(exist_ok=True)
        for i, label in zip(ids + tids, list(y) + list(ty)):
            arr = rng.integers(0, 60, (size, size)).astype(np.uint8)
            if task != "regression":  # a bright bar whose row encodes the class: learnable
                r = int(label) * size // max(n_classes, 1)
                arr[r:r + max(size // n_classes, 1), :] = 250
            Image.fromarray(arr, mode="L").save(root / "images" / f"{i}.png")
    return root


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _outside_the_repository(tmp_path, monkeypatch):
    """Every test runs in its own temporary directory: nothing (leaderboard, folds, models) is written
    into the repository's own workspace. `make -jN test` must not make the cache decisions under test
    count N parallel jobs (data.cache=auto reads MAKEFLAGS)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAKEFLAGS", raising=False)


# the command line refuses to run a stage without a config file; tests choose the built-in defaults on purpose
CFG = ["--defaults"]


@pytest.fixture
def competition(tmp_path):
    return make_competition(tmp_path / "comp")


def config_for(root: Path, tmp_path: Path, *overrides: str, group: str | None = "grp", task: str = "multiclass"):
    base = [f"competition.root={root}", f"folds.file={tmp_path}/folds/{{competition}}.csv",
            f"competition.task={task}", "competition.metric=" + ("rmse" if task == "regression" else "accuracy"),
            "data.in_chans=1", "data.image_size=16"]
    if group:
        base.append(f"competition.group={group}")
    return load_config(None, base + list(overrides))


@pytest.fixture
def cfg(competition, tmp_path):
    return config_for(competition, tmp_path)


TINY = ["model.backbone=test_resnet", "train.epochs=2", "train.batch_size=16", "train.lr=0.003",
        "data.num_workers=0", "folds.n_splits=3", "features.batch_size=64"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A temporary project directory (stages write models/, features/, submissions/ under cwd)."""
    monkeypatch.chdir(tmp_path)
    make_competition(tmp_path / "comp", n=90, n_groups=12, n_classes=3, size=16)
    return tmp_path


def tiny_cfg(root: Path, *overrides: str, name: str = "tiny"):
    from pipeline.stages import folds

    cfg = load_config(None, [f"competition.root={root}", "competition.group=grp", "competition.tabular=[tab]",
                             "folds.file=folds/{competition}.csv", "data.in_chans=1", "data.image_size=16",
                             f"name={name}", *TINY, *overrides])
    folds.run(cfg)
    return cfg


def record_in_two_processes(setting: str, n: int = 200) -> None:
    """Two processes each record ``n`` runs (experiments p0, p1) in the leaderboard named by ``setting``
    (``leaderboard.path=...`` or ``leaderboard.url=...``), at the same time."""
    import subprocess
    import sys

    code = ("import sys, time; from pipeline.store import leaderboard as LB; from pipeline.config.loading import load_config\n"
            f"cfg = load_config(None, ['{setting}', 'name=' + sys.argv[1]])\n"
            f"for i in range({n}): LB.record(cfg, 'train', time.time(), cv=i / {n}, folds={{'fold0': i / {n}}},"
            " epochs=[{'fold': 0, 'epoch': 1, 'score': 0.5}])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"p{i}"]) for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
