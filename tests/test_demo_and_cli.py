import pandas as pd

from pipeline.__main__ import main
from pipeline.stages.data import build
from pipeline.store.io import file_hash
from tests.conftest import CFG


def test_demo_competition_is_deterministic_and_kaggle_shaped(tmp_path):
    a = build(tmp_path / "a")
    b = build(tmp_path / "b")
    for name in ("train.csv", "test.csv", "sample_submission.csv", "solution.csv", "images/d0000.png"):
        assert file_hash(a / name) == file_hash(b / name)
    train, test = pd.read_csv(a / "train.csv"), pd.read_csv(a / "test.csv")
    sub, sol = pd.read_csv(a / "sample_submission.csv"), pd.read_csv(a / "solution.csv")
    assert len(train) + len(test) == 1797
    assert set(train["writer"]).isdisjoint(test["writer"])  # whole writers held out, as in a grouped competition
    assert list(sub["id"]) == list(test["id"]) == list(sol["id"])
    assert set(sol["Usage"]) == {"Public", "Private"}
    assert "target" not in test.columns
    assert len(list((a / "images").glob("*.png"))) == 1797


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    code = main(["folds", *CFG, f"competition.root={tmp_path}/missing", f"folds.file={tmp_path}/f.csv"])
    assert code == 2
    assert "train file not found" in capsys.readouterr().err
    assert not (tmp_path / "f.csv").exists()


def test_cli_unknown_key(capsys):
    assert main(["folds", *CFG, "folds.nsplits=3"]) == 2
    assert "folds.n_splits" in capsys.readouterr().err


def test_debug_flag_shows_the_traceback(tmp_path):
    import pytest

    from pipeline.errors import InputError

    with pytest.raises(InputError, match="train file not found"):
        main(["--debug", "folds", *CFG, f"competition.root={tmp_path}/missing"])


def test_every_user_error_class_is_caught_by_the_cli(tmp_path, capsys):
    # leaderboard errors (bad pattern, unknown experiment) end in `error:` and exit 2, not a traceback
    assert main(["lb", "--pattern", "(", f"leaderboard.path={tmp_path}/lb.db"]) == 2
    assert "not a valid pattern" in capsys.readouterr().err
    assert main(["lb", "set", "nope", "--public", "1", f"leaderboard.path={tmp_path}/lb.db"]) == 2
    assert "unknown experiment" in capsys.readouterr().err


def test_outputs_go_to_the_project_whatever_the_current_directory(tmp_path, monkeypatch):
    """`python -m pipeline folds -c /path/proj/configs/x.yaml` typed in another directory writes into the
    project (folds/, the leaderboard), not where it was typed."""
    import os

    from tests.conftest import make_competition

    proj = tmp_path / "proj"
    make_competition(proj / "comp", n=60, n_groups=9, n_classes=3, size=16)
    (proj / "configs").mkdir()
    (proj / "configs" / "x.yaml").write_text("name: x\ncompetition: {root: comp, group: grp}\nfolds: {n_splits: 3}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["folds", "-c", str(proj / "configs" / "x.yaml")]) == 0
    os.chdir(elsewhere)
    assert (proj / "folds" / "demo.csv").exists() and (proj / "submissions" / "leaderboard.db").exists()
    assert not any(elsewhere.iterdir())
