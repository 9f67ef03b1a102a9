"""Hostile inputs a new user or a shared file can bring (issue 22): nothing lost, nothing executed,
nothing silently wrong. Each test fails when its fix is taken out."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.__main__ import main
from tests.conftest import CFG, ROOT, make_competition



@pytest.fixture
def DEMO(tmp_path) -> str:
    """configs/demo.yaml copied into the test's folder: the stages work in the config's project."""
    (tmp_path / "configs" / "demo.yaml").write_text((ROOT / "configs" / "demo.yaml").read_text())
    return str(tmp_path / "configs" / "demo.yaml")

BASE = ["competition.root=comp", "competition.group=grp", "data.in_chans=1", "data.image_size=16",
        "model.backbone=test_resnet", "train.epochs=1", "train.batch_size=16", "folds.n_splits=3", "name=tiny",
        "data.num_workers=0"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1, err
    line = err.split("\r")[-1].strip().splitlines()[-1]
    assert line.startswith("error: "), err
    return line


# -- 1. the demo generator never deletes a user's folder ------------------------------------------------------
def test_demo_generator_refuses_a_folder_it_did_not_make(tmp_path, capsys, DEMO):
    mine = tmp_path / "my-competition"
    mine.mkdir()
    (mine / "train.csv").write_text("id,target\nmy,1\n")
    (mine / "notes.txt").write_text("precious")
    assert main(["data", "-c", DEMO, f"competition.root={mine}"]) == 2  # (make folds runs this first)
    err = _error_line(capsys)
    assert str(mine) in err and "did not write" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "train.csv"]
    assert (mine / "train.csv").read_text() == "id,target\nmy,1\n"
    assert not list(tmp_path.glob(".my-competition.*"))  # no scratch folder left beside it


def test_demo_generator_rebuilds_only_its_own_files(tmp_path, capsys, DEMO):
    demo = tmp_path / "demo"
    assert main(["data", "-c", DEMO, f"competition.root={demo}"]) == 0
    n_images = len(list((demo / "images").iterdir()))
    assert n_images == 1797 and (demo / "demo.json").exists()
    (demo / "train.csv").write_text("edited")
    (demo / "my-notes.txt").write_text("keep me")
    assert main(["data", "-c", DEMO, f"competition.root={demo}"]) == 0  # up to date: nothing rewritten
    assert (demo / "train.csv").read_text() == "edited"
    assert main(["data", "-c", DEMO, f"competition.root={demo}", "--force"]) == 0
    assert (demo / "my-notes.txt").read_text() == "keep me"  # a file of the user's survives a rebuild
    assert len(pd.read_csv(demo / "train.csv")) > 1000
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "-c", DEMO, f"competition.root={empty}"]) == 0  # an empty folder is fine to fill
    assert len(list((empty / "images").iterdir())) == n_images


def test_two_demo_generators_at_once_both_succeed(tmp_path):
    code = ("import sys; from pipeline import demo; demo.build(sys.argv[1])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "demo")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("up to date" in o for o in outs) == 1  # the second waited for the first, then found it done
    assert len(list((tmp_path / "demo" / "images").iterdir())) == 1797
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs", "demo"]  # no scratch folder left


# -- 2. a checkpoint never runs code ---------------------------------------------------------------------------
class _Planted:
    """A pickled callable: unpickling it with weights_only=False writes a file."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def _plant(path: Path, witness: Path, layout: str = "state") -> Path:
    payload = {"conv1.weight": torch.zeros(1), "evil": _Planted(witness)}
    if layout == "fold":
        payload = {"model": payload, "heads": [], "model_cfg": {}, "data_cfg": {}, "stage_key": "x"}
    torch.save(payload, path)
    return path


def test_a_crafted_checkpoint_runs_nothing_and_the_error_names_it(tmp_path, capsys):
    from pipeline.errors import InputError
    from pipeline.models import create_backbone, load_backbone_weights, load_model

    witness = tmp_path / "pwned.txt"
    evil = _plant(tmp_path / "evil.pt", witness)
    with pytest.raises(InputError, match="evil.pt"):
        load_backbone_weights(create_backbone("test_resnet", 1), evil)
    with pytest.raises(InputError, match="evil_fold.pt.*could run code"):
        load_model(_plant(tmp_path / "evil_fold.pt", witness, "fold"))
    assert not witness.exists()
    # through the command line: model.init names the planted file
    make_competition(tmp_path / "comp", n=60, n_groups=9, n_classes=3, size=16)
    assert main(["folds", *CFG, *BASE]) == 0
    assert main(["train", *CFG, *BASE, f"model.init={evil}"]) == 2
    assert "evil.pt" in _error_line(capsys)
    assert not witness.exists()


def test_a_crafted_fold_checkpoint_is_refused_by_every_reader(tmp_path, capsys):
    """A fold's best.pt/last.pt replaced by a planted file (a teammate's models folder): resume, features
    and the Predictor refuse it; nothing runs."""
    from pipeline.errors import InputError
    from pipeline.predict import Predictor

    witness = tmp_path / "pwned.txt"
    make_competition(tmp_path / "comp", n=60, n_groups=9, n_classes=3, size=16)
    for stage in ("folds", "train"):
        assert main([stage, *CFG, *BASE]) == 0
    fold0 = tmp_path / "models" / "tiny" / "fold0"
    good = torch.load(fold0 / "best.pt", weights_only=True)  # our own checkpoints load with weights_only
    assert "model" in good and torch.load(fold0 / "last.pt", weights_only=True)["rng"]
    good["model"]["evil"] = _Planted(witness)
    torch.save(good, fold0 / "best.pt")
    assert main(["features", *CFG, *BASE, "--force"]) == 2
    assert "best.pt" in _error_line(capsys)
    with pytest.raises(InputError, match="best.pt"):
        Predictor.from_experiment(tmp_path / "models" / "tiny")
    assert not witness.exists()


def test_resume_from_last_pt_restores_numpy_rng(tmp_path):
    """last.pt keeps numpy's RNG as a tensor (weights_only-loadable) and restores it exactly."""
    from pipeline.resume import _numpy_rng_from, _numpy_rng_state

    np.random.seed(123)
    state = _numpy_rng_state()
    torch.save({"rng": state}, tmp_path / "s.pt")
    expected = np.random.random(5)
    np.random.seed(7)
    np.random.set_state(_numpy_rng_from(torch.load(tmp_path / "s.pt", weights_only=True)["rng"]))
    assert np.array_equal(np.random.random(5), expected)


# -- 6. a fold whose best.pt is lost is trained again --------------------------------------------------------
def test_a_fold_without_its_weights_is_trained_again(tmp_path):
    from pipeline.stages import run_stage
    from tests.conftest import tiny_cfg

    make_competition(tmp_path / "comp", n=60, n_groups=9, n_classes=3, size=16)
    cfg = tiny_cfg(tmp_path / "comp", "train.epochs=1")
    run_stage("train", cfg)
    fold0 = tmp_path / "models" / "tiny" / "fold0"
    (fold0 / "best.pt").unlink()
    run_stage("train", cfg)
    assert (fold0 / "best.pt").exists()
    log = pd.read_csv(fold0 / "log.csv")
    assert list(log["epoch"]) == [1]  # trained from the start, not "resumed" past the end
    run_stage("features", cfg)  # and the next stage finds every fold
    assert (tmp_path / "features" / "tiny" / "oof.parquet").exists()


# -- 8. a stage needs a config file ---------------------------------------------------------------------------
def test_a_stage_without_a_config_file_is_refused(tmp_path, capsys):
    make_competition(tmp_path / "comp", n=60, n_groups=9, n_classes=3, size=16)
    assert main(["folds", "competition.root=comp"]) == 2
    assert "-c configs/" in _error_line(capsys)
    assert not (tmp_path / "folds").exists()


# -- 12. a diverged run stops, naming the epoch --------------------------------------------------------------
def test_a_nan_loss_stops_the_fold_and_saves_nothing(tmp_path, capsys):
    make_competition(tmp_path / "comp", n=60, n_groups=9, n_classes=3, size=16)
    assert main(["folds", *CFG, *BASE]) == 0
    assert main(["train", *CFG, *BASE, "train.lr=1e12", "train.optimizer=sgd",
                 "train.warmup_epochs=0", "train.folds=[0]"]) == 2
    err = _error_line(capsys)
    assert "fold 0 epoch 1/1" in err and "train.lr" in err
    assert not (tmp_path / "models" / "tiny" / "fold0" / "best.pt").exists()
