"""`tune`: an Optuna study whose trials are ordinary experiments, shared by several worker processes."""
import time
from pathlib import Path

import pytest
from tune_workers import logs, trials, tune_config, tune_rows, worker

from pipeline.__main__ import main
from pipeline.config.loading import load_config
from pipeline.stages import run_stage
from tests.conftest import CFG

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402


@pytest.mark.parametrize("param,named,says", [
    ("train.lrr={low: 0.001, high: 0.01}", "tune.params.train.lrr", "Did you mean: train.lr"),
    ("train.lr={low: 0.1, high: 0.01}", "tune.params.train.lr", "low 0.1 > high 0.01"),
    ("train.lr={low: 0.0, high: 0.01, log: true}", "tune.params.train.lr", "log scale needs low > 0"),
    ("model.pool={choices: []}", "tune.params.model.pool", "an empty categorical"),
    ("model.pool={choices: [avg, max]}", "tune.params.model.pool", "'max'"),
    ("train.lr={low: -0.01, high: 0.01}", "tune.params.train.lr", "greater than 0"),
    ("train.epochs={low: 1.0, high: 3.5}", "tune.params.train.epochs", "integer"),
    ("name={choices: [a, b]}", "tune.params.name", "cannot be searched"),
])
def test_a_bad_search_space_is_refused_before_any_training(tmp_path, capsys, param, named, says):
    assert main(["tune", *CFG, f"tune.params.{param}", "model.backbone=test_resnet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and says in err, err
    assert not any((tmp_path / d).exists() for d in ("models", "tune", "submissions"))  # nothing trained or created


def test_an_empty_space_and_a_stray_enqueued_key_are_refused(capsys):
    assert main(["tune", *CFG]) == 2
    assert "tune.params is empty" in capsys.readouterr().err
    assert main(["tune", *CFG, "tune.params.train.lr={low: 0.001, high: 0.01}", "tune.enqueue=[{train.epochs: 3}]"]) == 2
    assert "tune.enqueue[0] sets train.epochs, which tune.params does not search" in capsys.readouterr().err


def test_a_storage_that_cannot_be_reached_is_a_user_error_that_hides_the_password(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    space = "tune.params.train.lr={low: 0.001, high: 0.01}"
    assert main(["tune", *CFG, space, f"tune.storage=postgresql://me:secret@127.0.0.1:{port}/optuna"]) == 2
    err = capsys.readouterr().err
    assert "tune.storage postgresql://me:***@127.0.0.1" in err and "cannot open the study storage" in err
    assert "secret" not in err and not (tmp_path / "models").exists()


def test_nested_and_dotted_params_merge_and_types_are_inferred():
    cfg = load_config(None, ["tune.params={train.lr: {low: 1.0e-4, high: 1.0e-2}, model.pool: {choices: [avg, gem]}}",
                             "tune.params.train.lr.log=true", "tune.params.train.epochs={low: 2, high: 6}"])
    p = cfg["tune"]["params"]
    assert (p["train.lr"]["type"], p["train.lr"]["log"], p["train.lr"]["high"]) == ("float", True, 1e-2)
    assert p["model.pool"]["type"] == "categorical" and p["train.epochs"]["type"] == "int"


def test_two_workers_share_one_sqlite_study(tmp_path):
    cfg_path = tune_config(tmp_path, "tune.trials=6")
    procs = [worker(cfg_path) for _ in range(2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0], logs(cfg_path)
    got = trials(f"sqlite:///{tmp_path}/tune/tiny/study.db")
    # exactly N trials over both workers, none run twice, at least one pruned on its per-epoch scores
    assert [t.number for t in got] == list(range(6))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in got)
    assert any(t.state == TrialState.PRUNED for t in got), [(t.params, t.state) for t in got]
    assert len({t.params["train.lr"] for t in got}) == 6
    assert all(t.intermediate_values for t in got)  # every trial reported its validation scores
    # every trial is an experiment: its resolved config is saved and it has its leaderboard row
    names = [f"tiny-trial{k:03d}" for k in range(6)]
    assert [p.stem for p in sorted((tmp_path / "tune/tiny/trials").glob("*.yaml"))] == names
    assert tune_rows(tmp_path / "submissions/leaderboard.db") == list(zip(range(6), names))
    assert load_config(tmp_path / "tune/tiny/trials/tiny-trial002.yaml")["train"]["folds"] == 0
    for png in ("history.png", "importance.png"):
        assert (tmp_path / "tune/tiny" / png).read_bytes()[:4] == b"\x89PNG"
    # the best config is a full config `make train` runs as it is (all folds, the best trial's values)
    best = load_config(tmp_path / "configs/tiny-best.yaml")
    top = max((t for t in got if t.state == TrialState.COMPLETE), key=lambda t: -t.value)  # logloss: lower is better
    assert (best["name"], best["train"]["folds"], best["train"]["lr"]) == ("tiny-best", None, top.params["train.lr"])
    summary = run_stage("train", best)
    assert sorted(summary["folds"]) == ["fold0", "fold1", "fold2"]


def test_a_worker_killed_mid_trial_leaves_it_failed_and_another_takes_its_place(tmp_path):
    cfg_path = tune_config(tmp_path, "tune.trials=2", "tune.heartbeat=1", "tune.grace=2", "tune.enqueue=[]")
    killed = worker(cfg_path, env={"PIPELINE_KILL_AT": "epoch:1"})
    assert killed.wait(timeout=300) == -9
    storage = f"sqlite:///{tmp_path}/tune/tiny/study.db"
    assert [t.state for t in trials(storage)] == [TrialState.RUNNING]  # nobody is left to say otherwise
    time.sleep(3)  # past the grace period: the heartbeat has stopped
    assert worker(cfg_path).wait(timeout=300) == 0, logs(cfg_path)
    states = [t.state for t in trials(storage)]
    assert states[0] == TrialState.FAIL and len(states) == 3  # the failed trial does not count toward N
    assert all(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states[1:])


def test_full_cv_trials_under_hyperband_report_every_fold_epoch(tmp_path):
    cfg_path = tune_config(tmp_path, "tune.trials=2", "tune.folds=all", "tune.pruner=hyperband", "tune.enqueue=[]")
    assert main(["tune", "-c", str(cfg_path)]) == 0
    got = trials(f"sqlite:///{tmp_path}/tune/tiny/study.db")
    assert len(got) == 2 and got[0].state == TrialState.COMPLETE
    assert sorted(got[0].intermediate_values) == list(range(6))  # 3 folds x 2 epochs, one step per validation
    assert load_config(tmp_path / "tune/tiny/trials/tiny-trial000.yaml")["train"]["folds"] is None


def test_a_rerun_of_a_finished_study_trains_nothing(tmp_path, capsys):
    cfg_path = tune_config(tmp_path, "tune.trials=1", "tune.enqueue=[]")
    assert main(["tune", "-c", str(cfg_path)]) == 0
    first = Path("configs/tiny-best.yaml").read_text()
    assert main(["tune", "-c", str(cfg_path)]) == 0
    assert "[train]" not in capsys.readouterr().out.split("study 'tiny'")[-1]
    assert Path("configs/tiny-best.yaml").read_text() == first and len(trials(
        f"sqlite:///{tmp_path}/tune/tiny/study.db")) == 1
