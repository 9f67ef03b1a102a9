"""The whole Make chain on the demo competition, in a scratch copy of the project (short training)."""
import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_make_demo_chain(tmp_path):
    for item in ("Makefile", "configs", "requirements.txt", "pyproject.toml"):
        src = ROOT / item
        (partial(shutil.copytree, dirs_exist_ok=True) if src.is_dir() else shutil.copy2)(src, tmp_path / item)
    for item in ("requirements.txt", "pyproject.toml"):  # older than the venv's stamp: `make setup` does nothing
        os.utime(tmp_path / item, (0, 0))  # (a reinstall from here would point the venv at this copy)
    venv = Path(sys.executable).parent.parent
    args = "train.epochs=2 model.backbone=test_resnet folds.n_splits=3"  # (3 folds: fewer processes to start)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # the command the product is known by, on a clean copy: stack brings the features it reads up to date
    first = subprocess.run(["make", "folds", "train", "stack", "submit", f"VENV={venv}", f"ARGS={args}"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[features] wrote" in first.stdout and "level-2 CV accuracy" in first.stdout
    assert (tmp_path / "submissions/demo-resnet-l2.csv").exists()
    # then the whole demo: demo-resnet's models and features are reused, not retrained
    run = subprocess.run(["make", "demo", f"VENV={venv}", f"ARGS={args}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "demo-resnet fold 0:" not in out and "[train] demo-small fold 0:" in out
    # (demo-resnet's submission is its level 2 from the first command: submit takes a config's furthest stage)
    for f in ("folds/demo.csv", "folds/demo.report.png", "models/demo-resnet/fold2/best.pt",
              "features/demo-resnet/oof.parquet", "features/demo-small/test.parquet", "features/demo-stack/oof.parquet",
              "submissions/demo-small.csv", "submissions/demo-stack.csv"):
        assert (tmp_path / f).exists(), f
    sub = pd.read_csv(tmp_path / "submissions/demo-stack.csv")
    sample = pd.read_csv(tmp_path / "data/demo/sample_submission.csv")
    assert list(sub["id"]) == list(sample["id"]) and sub["target"].between(0, 9).all()
    assert "level-2 CV accuracy" in out and "public" in out and "private" in out
    # the leaderboard printed at the end has every experiment with its CV and the local LB scores
    table = out[out.rindex("experiment "):]
    for exp in ("demo-stack", "demo-resnet", "demo-small"):
        assert exp in table
    row = next(line for line in table.splitlines() if line.startswith("demo-stack"))
    assert row.split()[1] == "stack" and len(row.split()) >= 9
    # a second run finds everything up to date and trains nothing
    again = subprocess.run(["make", "demo", f"VENV={venv}", f"ARGS={args}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert "epoch 1/" not in again.stdout and "up to date" in again.stdout
    # changing one stack.* key reruns stack, postprocess and submit only
    third = subprocess.run(["make", "stack", "postprocess", "submit", "CONFIG=configs/demo-stack.yaml", f"VENV={venv}",
                            f"ARGS={args} stack.lgbm.num_leaves=7"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    out3 = third.stdout
    assert "epoch 1/" not in out3 and "[features] demo-" not in out3  # no training, no features recomputed
    assert out3.count("[features] up to date") == 2 and "[folds] up to date" in out3
    assert "[stack] demo-stack (lgbm) level-2 CV" in out3 and "[postprocess] demo-stack-pp" in out3
    assert "[submit] wrote submissions/demo-stack-pp.csv" in out3


def test_make_j2_trains_folds_in_parallel_then_summarises(tmp_path):
    from tests.conftest import make_competition

    for item in ("Makefile", "requirements.txt", "pyproject.toml"):
        shutil.copy2(ROOT / item, tmp_path / item)
    for item in ("requirements.txt", "pyproject.toml"):  # older than the venv's stamp: `make setup` does nothing
        os.utime(tmp_path / item, (0, 0))
    make_competition(tmp_path / "comp", n=90, n_groups=12, n_classes=3, size=16)
    (tmp_path / "tiny.yaml").write_text(
        "name: tiny\ncompetition: {name: tiny, root: comp, group: grp}\nfolds: {n_splits: 3}\n"
        "data: {in_chans: 1, image_size: 16}\nmodel: {backbone: test_resnet}\ntrain: {epochs: 1, batch_size: 16}\n")
    venv = Path(sys.executable).parent.parent
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["make", "-j2", "train", f"VENV={venv}", "CONFIG=tiny.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for k in range(3):
        assert f"train.folds=[{k}]" in run.stdout
        assert (tmp_path / f"models/tiny/fold{k}/best.pt").exists()
    summary = json.loads((tmp_path / "models/tiny/summary.json").read_text())["summary"]
    assert sorted(summary["folds"]) == ["fold0", "fold1", "fold2"] and summary["oof_rows"] == 90
    import sqlite3

    con = sqlite3.connect(tmp_path / "submissions/leaderboard.db")
    last = con.execute("SELECT folds FROM runs WHERE stage='train' ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert sorted(json.loads(last)) == ["fold0", "fold1", "fold2"]  # the leaderboard's row covers every fold
