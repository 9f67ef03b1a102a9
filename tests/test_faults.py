"""Fault suite: kill -9 inside every stage, a failing writer, concurrent runs, stale weights.

A killed stage, rerun, ends with exactly what an uninterrupted run writes; a half-written group is
never read by the next stage; a failed write leaves the previous artifact intact and the stage not
up to date; two concurrent runs never mix their files.
"""
import errno
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config.loading import load_config
from pipeline.errors import InputError
from pipeline.stages import features as FE
from pipeline.stages import folds as FO
from pipeline.stages import postprocess as PP
from pipeline.stages import stack as S
from pipeline.stages import submit as SU
from pipeline.stages import train as T
from pipeline.store.io import read_json
from tests.conftest import TINY

CONFIG = "\n".join([
    "name: tiny", "competition: {root: comp, group: grp, tabular: [tab]}", "folds: {n_splits: 3}",
    "data: {in_chans: 1, image_size: 16}", "model: {backbone: test_resnet}",
    "train: {epochs: 2, batch_size: 16, lr: 0.003}", "features: {tta: hflip, batch_size: 64}",
    "postprocess: {class_scale: true}", "pretrain: {epochs: 2, batch_size: 16, max_images: 60}", ""])


@pytest.fixture
def project(workdir):
    (workdir / "tiny.yaml").write_text(CONFIG)
    return workdir


def cfg(*overrides):
    return load_config("tiny.yaml", list(overrides))


def cli(stage, *overrides, kill=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill:
        env["PIPELINE_KILL_AT"] = kill
    return subprocess.run([sys.executable, "-m", "pipeline", stage, "-c", "tiny.yaml", *overrides], env=env,
                          capture_output=True, text=True, timeout=600)


def frames(folder):
    return {p.name: pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))}


def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        pd.testing.assert_frame_equal(a[k], b[k])


def test_kill_9_in_every_later_stage_then_rerun_equals_an_uninterrupted_run(project):
    from pathlib import Path

    FO.run(cfg())
    T.run(cfg())
    # features: killed after fold 1's part; the group is not written, stack refuses to read it
    assert cli("features", kill="features:fold1").returncode == -9
    assert not Path("features/tiny/meta.json").exists()
    with pytest.raises(InputError, match="no features|incomplete"):
        S.run(cfg())
    FE.run(cfg())
    resumed = frames(Path("features/tiny"))
    FE.run(cfg(), force=True)
    same(resumed, frames(Path("features/tiny")))
    # stack: killed between two folds' models, and half-way through its commit (oof renamed, test not)
    for point in ("stack:fold1", "commit:1"):
        assert cli("stack", *(["--force"] if point == "commit:1" else []), kill=point).returncode == -9
        if point == "commit:1":
            with pytest.raises(InputError, match="incomplete"):
                PP.run(cfg())  # the next stage never reads a half-committed group
        S.run(cfg())
        resumed = frames(Path("features/tiny-l2"))
        S.run(cfg(), force=True)
        same(resumed, frames(Path("features/tiny-l2")))
    # postprocess and submit: killed mid-commit
    assert cli("postprocess", kill="commit:1").returncode == -9
    PP.run(cfg())
    resumed = frames(Path("features/tiny-l2-pp"))
    PP.run(cfg(), force=True)
    same(resumed, frames(Path("features/tiny-l2-pp")))
    assert cli("submit", kill="commit:1").returncode == -9
    SU.run(cfg())
    first = Path("submissions/tiny-l2-pp.csv").read_bytes()
    assert read_json("submissions/tiny-l2-pp.json")["rows"] == len(pd.read_csv("comp/test.csv"))
    SU.run(cfg(), force=True)
    assert Path("submissions/tiny-l2-pp.csv").read_bytes() == first


def test_kill_9_during_pretrain_then_rerun_equals_an_uninterrupted_run(project):
    from pathlib import Path

    FO.run(cfg())
    assert cli("pretrain", "name=killed", "data.image_size=24", kill="epoch:1").returncode == -9
    assert not Path("models/pretrain/killed-test_resnet.json").exists()  # not up to date
    # (both through the command line, so both use the same thread count: bitwise-equal weights)
    assert "resuming from" in cli("pretrain", "name=killed", "data.image_size=24").stdout
    assert cli("pretrain", "name=whole", "data.image_size=24").returncode == 0
    a = torch.load("models/pretrain/killed-test_resnet.pt", weights_only=True)
    b = torch.load("models/pretrain/whole-test_resnet.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_training_never_leaves_other_weights_marked_up_to_date(project):
    """The issue's reproduction: train 1 epoch; start 4 epochs at another lr and kill it after epoch 1;
    rerun the first command: it must not call the killed run's weights 'up to date'."""
    FO.run(cfg())
    first = ["train.folds=[0]", "train.epochs=1"]
    assert cli("train", *first).returncode == 0
    reference = torch.load("models/tiny/fold0/best.pt", weights_only=True)["model"]
    killed = cli("train", "train.folds=[0]", "train.epochs=4", "train.lr=0.05", kill="epoch:1")
    assert killed.returncode == -9
    again = cli("train", *first)
    assert again.returncode == 0 and "fold 0 up to date" not in again.stdout
    now = torch.load("models/tiny/fold0/best.pt", weights_only=True)["model"]
    assert all(torch.equal(reference[k], now[k]) for k in reference)  # the first config's weights again
    assert "fold 0 up to date" in cli("train", *first).stdout


def test_a_failed_run_keeps_the_experiment_config(project, monkeypatch):
    FO.run(cfg())
    T.run(cfg("train.folds=[0]", "train.epochs=1"))
    before = open("models/tiny/config.yaml").read()
    from pipeline.training import trainer

    def boom(self):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(trainer.FoldTrainer, "fit", boom)
    with pytest.raises(RuntimeError):
        T.run(cfg("train.folds=[0]", "train.epochs=3"))
    assert open("models/tiny/config.yaml").read() == before


def test_a_failing_writer_leaves_the_previous_artifact_intact_and_the_stage_not_up_to_date(project, monkeypatch):
    from pathlib import Path

    from pipeline.store import artifacts, io

    FO.run(cfg())
    T.run(cfg())
    FE.run(cfg("features.tta=none"))
    before = {p.name: p.read_bytes() for p in Path("features/tiny").iterdir() if p.is_file()}
    real, calls = io.parquet_to, []

    def disk_full(path, df, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second file of the group (test.parquet)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, df, metadata)

    monkeypatch.setattr(artifacts, "parquet_to", disk_full)
    with pytest.raises(OSError, match="No space left"):
        FE.run(cfg())  # tta=hflip: a new key
    after = {p.name: p.read_bytes() for p in Path("features/tiny").iterdir() if p.is_file()}
    assert after == before  # every file of the previous group, byte for byte; no temporaries left
    assert not list(Path("features/tiny").glob(".*.tmp"))
    S.run(cfg())  # the previous group is still complete and readable
    monkeypatch.setattr(artifacts, "parquet_to", real)
    out = FE.run(cfg())  # not up to date for the new key: it runs (from its per-fold parts)
    assert read_json(out / "meta.json")["stage_key"] != __import__("json").loads(before["meta.json"])["stage_key"]


def test_concurrent_folds_runs_never_mix_their_files(project):
    """Two processes writing the same folds file with different seeds: the CSV always matches the
    config and meta written beside it (the group is written under a lock)."""
    from pathlib import Path

    from pipeline.competition.tables import load_train

    for _ in range(3):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "folds", "-c", "tiny.yaml", f"folds.seed={s}"],
                                  env=env, stdout=subprocess.DEVNULL) for s in (7, 42)]
        assert [p.wait(timeout=300) for p in procs] == [0, 0]
        seed = load_config("folds/demo.config.yaml")["folds"]["seed"]
        c = cfg(f"folds.seed={seed}")
        expected = FO.make_folds(c, load_train(c, check_images=False))
        got = pd.read_csv("folds/demo.csv", dtype={"id": str})["fold"].to_numpy()
        assert np.array_equal(got, expected)
        meta = read_json("folds/demo.meta.json")
        assert meta["config_hash"] == __import__("pipeline.store.io", fromlist=["config_hash"]).config_hash(c)
        assert not list(Path("folds").glob(".*.tmp"))


def test_artifacts_honour_the_umask(project):
    from pathlib import Path

    old = os.umask(0o022)
    try:
        FO.run(cfg())
    finally:
        os.umask(old)
    for p in Path("folds").iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, p


def test_tiny_overrides_are_still_valid():
    load_config(None, TINY)  # the fast-test settings stay accepted by the typed config
