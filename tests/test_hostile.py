"""Hostile inputs a new user or a shared file can bring (issue 22): nothing lost, nothing executed,
nothing silently wrong. Each test fails when its fix is taken out."""
from __future__ import annotations

import re
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
    (tmp_path / "configs").mkdir()
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
    code = ("import sys; from pipeline.stages import data; data.build(sys.argv[1])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "demo")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("up to date" in o for o in outs) == 1  # the second waited for the first, then found it done
    assert len(list((tmp_path / "demo" / "images").iterdir())) == 1797
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no scratch folder left beside it


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
    from pipeline.training.build import load_backbone_weights
    from pipeline.training.checkpoint import load_model
    from pipeline.training.models import create_backbone

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
    from pipeline.predict.predictor import Predictor

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
    from pipeline.training.resume import _numpy_rng_from, _numpy_rng_state

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
    assert main(["folds", "--defaults", "competition.root=comp", "competition.group=grp", "folds.n_splits=3"]) == 0


# -- 12. a diverged run stops, naming the epoch --------------------------------------------------------------
def test_a_nan_loss_stops_the_fold_and_saves_nothing(tmp_path, capsys):
    make_competition(tmp_path / "comp", n=60, n_groups=9, n_classes=3, size=16)
    assert main(["folds", *CFG, *BASE]) == 0
    assert main(["train", *CFG, *BASE, "train.lr=1e12", "train.optimizer=sgd",
                 "train.warmup_epochs=0", "train.folds=[0]"]) == 2
    err = _error_line(capsys)
    assert "fold 0 epoch 1/1" in err and "train.lr" in err
    assert not (tmp_path / "models" / "tiny" / "fold0" / "best.pt").exists()


# -- 4. per-class probability columns are matched by label --------------------------------------------------
def test_probability_columns_are_filled_and_scored_by_label_not_position():
    from pipeline.competition.submission import class_columns, to_submission
    from pipeline.config.loading import load_config
    from pipeline.errors import SubmissionError

    cfg = load_config(None, ["competition.metric=logloss"])
    ids = ["a", "b"]
    pred = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    sample = pd.DataFrame({"id": ids, "2": 0.0, "0": 0.0, "1": 0.0})  # columns in another order than the classes
    sub = to_submission(cfg, pred, ids, sample)
    assert list(sub.columns) == ["id", "2", "0", "1"]
    assert sub["0"].tolist() == [0.7, 0.1] and sub["2"].tolist() == [0.1, 0.8]
    assert class_columns(["dog", "cat"], 2, ["cat", "dog"]) == ["cat", "dog"]  # string labels too
    assert class_columns(["Class_1", "Class_2"], 2) == ["Class_1", "Class_2"]  # no label named: in order
    with pytest.raises(SubmissionError, match="missing"):
        class_columns(["0", "x", "2"], 3)


def test_local_score_of_probability_columns_follows_the_labels(tmp_path):
    from pipeline.config.loading import load_config
    from pipeline.stages.submit import score_local

    root = tmp_path / "c"
    root.mkdir()
    ids = [f"t{i}" for i in range(6)]
    y = np.array([0, 1, 2, 0, 1, 2])
    pd.DataFrame({"id": ids, "target": y, "Usage": "Public"}).to_csv(root / "solution.csv", index=False)
    cfg = load_config(None, [f"competition.root={root}", "competition.metric=logloss"])
    p = np.full((6, 3), 0.05)
    p[np.arange(6), y] = 0.9
    sub = pd.DataFrame({"id": ids, "2": p[:, 2], "1": p[:, 1], "0": p[:, 0]})
    assert score_local(cfg, sub)["public"] == pytest.approx(-np.log(0.9), rel=1e-6)


# -- 5. every PIL mode is scaled, not clipped ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["I;16", "I", "F", "P", "RGBA", "LA", "CMYK", "1"])
def test_every_pil_mode_reads_on_its_own_scale(tmp_path, mode):
    from PIL import Image

    from pipeline.competition.images import read_image

    ramp = np.tile(np.linspace(0, 1, 16), (16, 1))  # 0 .. 1 left to right
    if mode == "I;16":
        img = Image.fromarray((ramp * 65535).astype(np.uint16))
        assert img.mode == "I;16"
    elif mode == "I":
        img = Image.fromarray((ramp * 65535).astype(np.int32), mode="I")
    elif mode == "F":
        img = Image.fromarray(ramp.astype(np.float32), mode="F")
    elif mode == "1":
        img = Image.fromarray(ramp > 0.5)
    else:
        img = Image.fromarray((ramp * 255).astype(np.uint8), mode="L").convert(mode)
        if mode in ("RGBA", "LA"):
            img.putalpha(255)
    path = tmp_path / ("x.tif" if mode in ("F", "I", "CMYK") else "x.png")
    img.save(path)
    assert Image.open(path).mode == mode
    gray = read_image(path, 1)[:, :, 0].astype(float)
    expected = (ramp > 0.5) * 255.0 if mode == "1" else ramp * 255
    assert np.abs(gray - expected).max() <= 3, (mode, gray[0])  # the whole range, not black and white
    assert read_image(path, 3).shape == (16, 16, 3)


def test_alpha_is_composited_and_an_unscalable_mode_is_refused(tmp_path):
    from PIL import Image

    from pipeline.competition.images import read_image
    from pipeline.errors import InputError

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 0  # fully transparent: over black
    rgba[0, :, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    g = read_image(tmp_path / "a.png", 1)[:, :, 0]
    assert g[0].tolist() == [200] * 4 and g[1:].max() == 0
    Image.fromarray(np.full((4, 4), -5.0, np.float32), mode="F").save(tmp_path / "neg.tif")
    with pytest.raises(InputError, match="neg.tif.*mode F"):
        read_image(tmp_path / "neg.tif", 1)


# -- 7. secrets never reach a file ---------------------------------------------------------------------------
def test_a_password_in_a_url_is_never_written(tmp_path, capsys):
    import sqlite3

    from pipeline.config.loading import load_config
    from pipeline.store import leaderboard
    from pipeline.store.io import dump_yaml, write_resolved_config

    cfg = load_config(None, ["tune.storage=postgresql://me:s3cret@db.example/optuna", "name=sec"])
    assert "s3cret" not in dump_yaml(cfg) and "me:***@db.example" in dump_yaml(cfg)
    write_resolved_config(tmp_path / "config.yaml", cfg)
    assert "s3cret" not in (tmp_path / "config.yaml").read_text()
    leaderboard.record(cfg, "train", 0.0, cv=0.5)
    rows = sqlite3.connect("submissions/leaderboard.db").execute("SELECT config FROM runs").fetchall()
    assert rows and all("s3cret" not in r[0] for r in rows) and "***" in rows[0][0]
    for get in (["--get", "tune.storage"], ["--get", "tune"], []):  # `pipeline config` prints to the log
        assert main(["config", "tune.storage=postgresql://me:s3cret@db.example/optuna", *get]) == 0
        assert "s3cret" not in capsys.readouterr().out


# -- 9. config values that would mean something else --------------------------------------------------------
def test_yaml_octal_and_duplicate_keys(tmp_path):
    from pipeline.config.loading import load_config
    from pipeline.errors import ConfigError

    (tmp_path / "a.yaml").write_text("train:\n  epochs: 010\n")
    assert load_config(tmp_path / "a.yaml")["train"]["epochs"] == 10
    assert load_config(None, ["train.epochs=010"])["train"]["epochs"] == 10
    (tmp_path / "b.yaml").write_text("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"b.yaml.*'epochs' is given twice \(lines 2 and 4\)") as e:
        load_config(tmp_path / "b.yaml")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override,says", [
    ("name=../outside", "one folder name"), ("name=a/b", "one folder name"), ("stack.name=..", "one folder name"),
    ("competition.image=images/x.png", "must contain {id}"),
    ("competition.image=train/{target}/{id}.png", "not {target}"), ("competition.image=img/{ID}.png", "not {ID}"),
])
def test_names_and_patterns_that_would_write_or_read_elsewhere_are_refused(override, says):
    from pipeline.config.loading import load_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(None, [override])


def test_a_tilde_means_the_home_folder(monkeypatch, tmp_path):
    from pipeline.config.loading import load_config

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(None, ["workdir=~/x", "competition.root=~/data"])
    assert cfg["workdir"] == str(tmp_path / "home" / "x") and cfg["competition"]["root"] == str(tmp_path / "home/data")


def test_one_class_and_an_empty_test_table_are_refused_at_folds(tmp_path, capsys):
    root = make_competition(tmp_path / "comp", n=60, n_groups=9, n_classes=3, size=16)
    df = pd.read_csv(root / "train.csv")
    df.assign(target=1).to_csv(root / "train.csv", index=False)
    assert main(["folds", *CFG, *BASE]) == 2
    assert "one class only" in _error_line(capsys)
    df.to_csv(root / "train.csv", index=False)
    pd.read_csv(root / "test.csv").iloc[:0].to_csv(root / "test.csv", index=False)
    assert main(["folds", *CFG, *BASE]) == 2
    assert "test.csv" in _error_line(capsys)
    assert not (tmp_path / "folds").exists()


# -- 10. a user's mistake is one error line, not a traceback ---------------------------------------------------
@pytest.mark.parametrize("argv,says", [
    (["train.folds=[0,", "1]"], "quote it whole"),
    (["name='abc"], "check its quotes"),
])
def test_command_line_quoting_mistakes(tmp_path, capsys, argv, says):
    make_competition(tmp_path / "comp", n=60, n_groups=9, n_classes=3, size=16)
    assert main(["folds", *CFG, *BASE, *argv]) == 2
    assert says in _error_line(capsys)


def test_leaderboard_text_with_equals_is_not_a_config_override(tmp_path, capsys):
    from pipeline.config.loading import is_override

    assert is_override("train.lr=0.1") and is_override("stack.lgbm.num_leaves=7")
    assert not is_override("lr=0.1") and not is_override("a=b") and not is_override("--pattern=x")
    assert main(["lb", "--pattern", "x=y"]) == 0  # a pattern holding '=' is the pattern, not an override


def test_a_corrupt_leaderboard_is_named_before_any_output(tmp_path, capsys):
    make_competition(tmp_path / "comp", n=60, n_groups=9, n_classes=3, size=16)
    (tmp_path / "submissions").mkdir()
    (tmp_path / "submissions" / "leaderboard.db").write_bytes(b"this is not sqlite" * 100)
    assert main(["folds", *CFG, *BASE]) == 2
    err = _error_line(capsys)
    assert "leaderboard.db" in err and "move it aside" in err
    assert not (tmp_path / "folds").exists()
    assert main(["lb", *CFG]) == 2
    assert "leaderboard.db" in _error_line(capsys)


def test_the_lock_folder_is_per_user(tmp_path, monkeypatch):
    """Another user's /tmp/pipeline-locks (not writable for us) does not stop our stages."""
    import tempfile

    from pipeline.store.artifacts import stage_lock

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    theirs = tmp_path / "pipeline-locks"
    theirs.mkdir()
    theirs.chmod(0o500)
    try:
        with stage_lock(tmp_path / "x"):
            pass
        assert any(p.name.startswith("pipeline-locks-") for p in tmp_path.iterdir())
    finally:
        theirs.chmod(0o700)


# -- 14. options a schedule or head would ignore are honoured or refused ---------------------------------------
@pytest.mark.parametrize("overrides,says", [
    (["train.scheduler=plateau", "train.warmup_epochs=1"], "plateau scheduler has no warm-up"),
    (["train.scheduler=none", "train.min_lr_ratio=0.1"], "no floor to set"),
    (["competition.task=regression", "competition.metric=rmse", "train.class_weights=[1, 2]"], "no classes to weight"),
])
def test_options_a_schedule_or_head_cannot_use_are_refused(overrides, says):
    from pipeline.config.loading import load_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(None, overrides)


def test_min_lr_ratio_floors_plateau_and_step_and_warmup_ramps_step_and_none():
    from pipeline.config.loading import load_config
    from pipeline.training.optim import SCHEDULERS, lr_lambda

    def tcfg(*o):
        return load_config(None, ["train.lr=0.1", "train.epochs=6", *o])["train"]

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = SCHEDULERS["plateau"](opt, tcfg("train.scheduler=plateau", "train.min_lr_ratio=0.25", "train.patience=0"),
                                  1, True)
    for _ in range(10):
        sched.step(0.0)  # never improves
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    f = lr_lambda(tcfg("train.scheduler=step", "train.milestones=[1, 2, 3]", "train.gamma=0.1",
                       "train.min_lr_ratio=0.05"), 1)
    assert [round(f(s), 4) for s in range(5)] == [1.0, 0.1, 0.05, 0.05, 0.05]
    for kind in ("step", "none"):
        f = lr_lambda(tcfg(f"train.scheduler={kind}", "train.warmup_epochs=2"), 2)
        assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_binary_class_weights_weigh_each_row_by_its_class():
    from pipeline.training.losses import bce, binary_focal
    from pipeline.training.models import Head

    head = Head("t", ["t"], "binary", 1)
    logits, y = torch.tensor([[0.3], [-0.2]]), torch.tensor([1.0, 0.0])
    opts = {"label_smoothing": 0.0, "focal_gamma": 2.0}
    cw = torch.tensor([1.0, 3.0])
    for fn in (bce, binary_focal):
        plain, weighted = fn(logits, y, head, opts), fn(logits, y, head, opts, cw)
        assert torch.allclose(weighted, plain * torch.tensor([3.0, 1.0]))


# -- 16. the validation loss is the plain loss --------------------------------------------------------------
def test_the_logged_validation_loss_is_plain_cross_entropy(tmp_path):
    from pipeline.stages import run_stage
    from tests.conftest import tiny_cfg

    make_competition(tmp_path / "comp", n=60, n_groups=9, n_classes=3, size=16)
    cfg = tiny_cfg(tmp_path / "comp", "train.epochs=1", "train.folds=[0]", "train.label_smoothing=0.4",
                   "train.ohem=0.5", "train.class_weights=[1, 5, 1]")
    run_stage("train", cfg)
    fold0 = tmp_path / "models" / "tiny" / "fold0"
    valid = pd.read_parquet(fold0 / "best_valid.parquet")
    y = pd.read_csv(tmp_path / "comp" / "train.csv", dtype={"id": str}).set_index("id").loc[valid["id"], "target"]
    p = valid[[c for c in valid.columns if c != "id"]].to_numpy()
    plain = float(-np.log(p[np.arange(len(p)), y.to_numpy()]).mean())
    logged = float(pd.read_csv(fold0 / "log.csv")["valid_loss"].iloc[0])
    assert logged == pytest.approx(plain, rel=1e-4)


# -- 18. a GPU this torch cannot drive falls back to the CPU -------------------------------------------------
def test_a_gpu_the_installed_torch_cannot_drive_falls_back_to_cpu(monkeypatch, capsys):
    from pipeline.training import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models, "_CUDA_OK", {})

    def no_kernel(*a, **k):
        if str(k.get("device", "")).startswith("cuda"):
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return torch.zeros(*a)

    monkeypatch.setattr(torch, "ones", no_kernel)
    assert models.pick_device("auto").type == "cpu"
    assert "cannot run on it (CUDA error: no kernel image" in capsys.readouterr().out
    monkeypatch.setattr(models, "_CUDA_OK", {"ok": True})  # a GPU that works is used
    assert models.pick_device("auto").type == "cuda"


# -- 15. model.init per fold; a cross-fold init is marked LEAKY ------------------------------------------------
def test_init_per_fold_is_clean_and_a_cross_fold_init_is_leaky(tmp_path):
    from pipeline.stages import run_stage
    from pipeline.store.io import read_json
    from tests.conftest import tiny_cfg

    make_competition(tmp_path / "comp", n=60, n_groups=9, n_classes=3, size=16)
    run_stage("train", tiny_cfg(tmp_path / "comp", "train.epochs=1", name="first"))
    own = tiny_cfg(tmp_path / "comp", "train.epochs=1", "model.init=models/first/fold{fold}/best.pt", "train.lr=1e-12",
                   "train.optimizer=sgd", name="own")  # (an lr that leaves the conv weights where they started)
    run_stage("train", own)
    metas = [read_json(tmp_path / f"models/own/fold{k}/meta.json") for k in range(3)]
    assert all(not m.get("leak") for m in metas)
    first = [torch.load(tmp_path / f"models/first/fold{k}/best.pt", weights_only=True)["model"] for k in range(3)]
    own1 = torch.load(tmp_path / "models/own/fold1/best.pt", weights_only=True)["model"]
    conv = next(k for k, v in own1.items() if v.ndim == 4)
    assert torch.allclose(own1[conv], first[1][conv]) and not torch.allclose(own1[conv], first[0][conv])
    cross = tiny_cfg(tmp_path / "comp", "train.epochs=1", "model.init=models/first/fold0/best.pt", name="cross")
    run_stage("train", cross)
    leak = read_json(tmp_path / "models/cross/fold1/meta.json").get("leak") or ""
    assert leak.startswith("LEAKY") and "fold 1 <- models/first/fold0/best.pt" in leak
    from pipeline.config.loading import load_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"only the placeholder \{fold\}"):
        load_config(None, ["model.init=models/a/fold{k}/best.pt"])


# -- 17. the hidden test set's categorical levels are the trained ones ------------------------------------------
def test_integer_codes_read_as_float_keep_their_trained_category(tmp_path, capsys):
    import json

    import lightgbm as lgb

    from pipeline.config.loading import load_config
    from pipeline.level2.models import SAVED, category_text, predict_saved
    from pipeline.stages.stack import tabular

    assert category_text(pd.Series([1.0, np.nan, 2.0])).tolist()[::2] == ["1", "2"]
    assert category_text(pd.Series(["1.0", "a", " 3 ", "1.5"])).tolist() == ["1", "a", "3", "1.5"]
    cfg = load_config(None, ["competition.tabular=[code]", "competition.categorical=[code]"])
    tr, te, cats = tabular(cfg, pd.DataFrame({"code": [1.0, 2.0, np.nan]}), pd.DataFrame({"code": [1, 2, 2]}))
    assert cats == ["code"] and list(tr["code"].dtype.categories) == ["1", "2"] and te["code"].tolist() == ["1", "2", "2"]
    # a level-2 model fitted where the column was read as text '1', '2': the hidden test reads it as 1.0, 2.0
    rng = np.random.default_rng(0)
    code = rng.integers(1, 3, 400).astype(str)
    X = pd.DataFrame({"code": pd.Categorical(code, categories=["1", "2"]), "p": rng.random(400)})
    y = (code == "2").astype(float)
    booster = lgb.train({"objective": "binary", "verbose": -1, "min_data_in_leaf": 5, "cat_smooth": 1}, lgb.Dataset(X, y),
                        num_boost_round=20)
    booster.save_model(str(tmp_path / "fold0.txt"))
    (tmp_path / SAVED).write_text(json.dumps({
        "model": "lgbm", "columns": ["code", "p"], "categorical": ["code"], "categories": {"code": ["1", "2"]},
        "test_mode": "mean", "files": {"fold0": "fold0.txt"}}))
    hidden = pd.DataFrame({"code": [1.0, 2.0, np.nan, 2.0], "p": [0.5] * 4})
    as_text = pd.DataFrame({"code": ["1", "2", None, "2"], "p": [0.5] * 4})
    p_hidden, p_text = predict_saved(tmp_path, hidden), predict_saved(tmp_path, as_text)
    assert np.allclose(p_hidden, p_text) and p_hidden[1] > 0.9 > 0.1 > p_hidden[0]
    unseen = pd.DataFrame({"code": [7.0, 8.0, 9.0, 1.0], "p": [0.5] * 4})
    predict_saved(tmp_path, unseen)
    assert "3 of 4 values of categorical column 'code' were never seen in training" in capsys.readouterr().out


# -- 3. every reader applies train --check's rule and never mixes configs ------------------------------------
def test_readers_refuse_fold_models_of_another_config_or_data(tmp_path, capsys):
    from PIL import Image

    from pipeline.errors import InputError
    from pipeline.predict.predictor import Predictor

    root = make_competition(tmp_path / "comp", n=60, n_groups=9, n_classes=3, size=16)
    for stage in ("folds", "train"):
        assert main([stage, *CFG, *BASE]) == 0
    # another backbone: train --check would retrain, so features refuses (with or without --force)
    for force in ([], ["--force"]):
        assert main(["features", *CFG, *BASE, "model.backbone=resnet10t", *force]) == 2
        assert "fold0: the fold model is out of date" in _error_line(capsys)
    assert main(["features", *CFG, *BASE]) == 0
    capsys.readouterr()
    # a label changed in train.csv, then one image's pixels: every reader sees it
    df = pd.read_csv(root / "train.csv")
    df.loc[0, "target"] = (df.loc[0, "target"] + 1) % 3
    df.to_csv(root / "train.csv", index=False)
    assert main(["train", "--check", *CFG, *BASE]) == 1
    assert main(["features", *CFG, *BASE]) == 2
    assert "out of date" in _error_line(capsys)
    assert main(["train", *CFG, *BASE]) == 0 and main(["features", *CFG, *BASE]) == 0
    assert main(["train", "--check", *CFG, *BASE]) == 0
    img = root / "images" / f"{df.loc[3, 'id']}.png"
    arr = np.asarray(Image.open(img)).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(img)
    assert main(["train", "--check", *CFG, *BASE]) == 1  # a changed pixel: would retrain
    capsys.readouterr()
    assert main(["features", *CFG, *BASE]) == 2
    # the Predictor refuses a mean over models of different configs
    assert main(["train", *CFG, *BASE, "name=other", "train.lr=0.01", "train.folds=[0]"]) == 0
    import shutil

    shutil.copy(tmp_path / "models/other/fold0/best.pt", tmp_path / "models/tiny/fold0/best.pt")
    with pytest.raises(InputError, match="2 different configs"):
        Predictor.from_experiment(tmp_path / "models" / "tiny")


# -- 21. the README's notebook example runs as written -------------------------------------------------------
def test_the_readme_notebook_example_runs_as_written(tmp_path, monkeypatch):
    import pipeline

    readme = (ROOT / "README.md").read_text()
    block = readme.split("From a notebook (offline)")[1].split("```python\n")[1].split("```")[0]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text((ROOT / "configs" / "demo.yaml").read_text())
    real = pipeline.load_config
    small = ["model.backbone=test_resnet", "train.epochs=1", "folds.n_splits=3", "data.num_workers=0"]
    monkeypatch.setattr(pipeline, "load_config", lambda path, o=(): real(path, [*o, *small]))  # tiny, same chain
    code = block.replace("/kaggle/working", str(tmp_path / "working"))
    exec(compile(code, "README.md", "exec"), {})
    sub = pd.read_csv(tmp_path / "working" / "submissions" / "demo-resnet.csv")
    assert len(sub) == len(pd.read_csv(tmp_path / "data" / "demo" / "test.csv"))


# -- 10 (cont.). a workdir that cannot be written; a ViT at a small size ------------------------------------
def test_an_unwritable_workdir_is_one_error_line(tmp_path, capsys):
    make_competition(tmp_path / "comp", n=60, n_groups=9, n_classes=3, size=16)
    assert main(["folds", *CFG, *BASE, f"competition.root={tmp_path / 'comp'}", "workdir=/sys/pipeline-x"]) == 2
    line = _error_line(capsys)
    assert "cannot write /sys/pipeline-x" in line and "workdir=" in line


def test_a_vit_trains_at_the_configured_size(tmp_path):
    from pipeline.stages import run_stage
    from tests.conftest import tiny_cfg

    make_competition(tmp_path / "comp", n=60, n_groups=9, n_classes=3, size=16)
    cfg = tiny_cfg(tmp_path / "comp", "train.epochs=1", "train.folds=[0]", "model.backbone=vit_tiny_patch16_224",
                   "data.image_size=32")
    run_stage("train", cfg)  # timm builds the ViT for 32 px (img_size), not its 224 default
    assert (tmp_path / "models/tiny/fold0/best.pt").exists()
