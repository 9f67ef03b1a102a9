import sqlite3
import time

import pandas as pd
import pytest

from pipeline.__main__ import main
from pipeline.config.loading import load_config
from pipeline.store import leaderboard as LB
from tests.conftest import record_in_two_processes


def cfg_for(db, metric="accuracy", name="exp"):
    task = "regression" if metric in ("rmse", "mae") else "multiclass"
    return load_config(None, [f"leaderboard.path={db}", f"competition.metric={metric}", f"competition.task={task}",
                              f"name={name}"])


def test_two_processes_recording_200_runs_each_lose_nothing(tmp_path):
    db = tmp_path / "lb.db"
    record_in_two_processes(f"leaderboard.path={db}")
    con = sqlite3.connect(db)
    assert con.execute("SELECT experiment, COUNT(*) FROM runs GROUP BY experiment ORDER BY 1").fetchall() == [
        ("p0", 200), ("p1", 200)]
    assert con.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 400
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("metric,expected", [("accuracy", ["b", "a", "c"]), ("rmse", ["c", "a", "b"]),
                                             ("logloss", ["c", "a", "b"])])
def test_order_respects_metric_direction(tmp_path, metric, expected):
    db = tmp_path / "lb.db"
    for name, cv in (("a", 0.5), ("b", 0.9), ("c", 0.1)):
        LB.record(cfg_for(db, metric, name), "features", time.time(), cv=cv, folds={"fold0": cv, "fold1": cv + 0.02})
    t = LB.table(db)
    assert list(t["experiment"]) == expected
    assert t["delta"].iloc[0] == 0 and t["fold_std"].iloc[0] == pytest.approx(0.01)


def test_a_leaky_cv_is_marked_and_is_not_the_reference_for_delta(tmp_path):
    db = tmp_path / "lb.db"
    LB.record(cfg_for(db, name="honest"), "features", time.time(), cv=0.7)
    LB.record(cfg_for(db, name="leaky"), "features", time.time(), cv=0.9, note="LEAKY: distilled from OOF")
    t = LB.table(db).set_index("experiment")
    assert list(t.index) == ["leaky (LEAKY)", "honest"]  # still ranked by its CV, but marked
    assert t.loc["honest", "delta"] == 0 and t.loc["leaky (LEAKY)", "delta"] == pytest.approx(0.2)


def test_stack_beats_features_beats_train_for_an_experiment_row(tmp_path):
    db = tmp_path / "lb.db"
    LB.record(cfg_for(db, name="x"), "features", time.time(), cv=0.7)
    LB.record(cfg_for(db, name="x"), "train", time.time(), cv=0.6)  # later, but a less informed stage
    t = LB.table(db)
    assert (t["stage"].tolist(), t["cv"].tolist()) == (["features"], [0.7])
    LB.record(cfg_for(db, name="x"), "stack", time.time(), cv=0.65)
    LB.record(cfg_for(db, name="x"), "features", time.time(), cv=0.9)  # later, but stack outranks it
    t = LB.table(db)
    assert (t["stage"].tolist(), t["cv"].tolist()) == (["stack"], [0.65])
    LB.record(cfg_for(db, name="x"), "stack", time.time(), cv=0.66)  # the latest run of the top stage wins
    assert LB.table(db)["cv"].tolist() == [0.66]


def _submitted(db, name, file):
    LB.record(cfg_for(db, name=name), "features", time.time(), cv=0.8)
    LB.record(cfg_for(db, name=name), "submit", time.time(), submission=file)


def test_lb_set_and_errors(tmp_path, capsys):
    db = tmp_path / "lb.db"
    _submitted(db, "exp1", "submissions/exp1.csv")
    assert main(["lb", "set", "exp1", "--public", "0.81", "--private", "0.79", f"leaderboard.path={db}"]) == 0
    t = LB.table(db)
    assert (t["public"].iloc[0], t["private"].iloc[0]) == (0.81, 0.79)
    assert main(["lb", "set", "submissions/exp1.csv", "--private", "0.8", f"leaderboard.path={db}"]) == 0
    assert (LB.table(db)["public"].iloc[0], LB.table(db)["private"].iloc[0]) == (0.81, 0.8)
    assert main(["lb", "set", "exp1", "--public", "abc", f"leaderboard.path={db}"]) == 2
    assert "must be a number" in capsys.readouterr().err
    assert main(["lb", "set", "nope", "--public", "0.5", f"leaderboard.path={db}"]) == 2
    assert "unknown experiment or submission 'nope'; known experiments: exp1" in capsys.readouterr().err


def test_kaggle_client_csv_import_matches_rows(tmp_path):
    db = tmp_path / "lb.db"
    _submitted(db, "resnet-a", "submissions/resnet-a.csv")
    _submitted(db, "effnet-b", "submissions/effnet-b.csv")
    csv = tmp_path / "kaggle.csv"
    pd.DataFrame({"fileName": ["resnet-a.csv", "submission.csv", "other.csv"],
                  "date": ["2026-11-20 10:00:00"] * 3,
                  "description": ["first try", "effnet-b with tta", "unrelated"],
                  "status": ["complete"] * 3,
                  "publicScore": [0.91, 0.93, 0.5], "privateScore": [0.90, None, 0.5]}).to_csv(csv, index=False)
    matched = LB.import_kaggle_csv(db, csv)
    assert sorted(matched) == [("resnet-a.csv", "resnet-a"), ("submission.csv", "effnet-b")]
    t = LB.table(db).set_index("experiment")
    assert t.loc["resnet-a", "public"] == 0.91 and t.loc["resnet-a", "private"] == 0.90
    assert t.loc["effnet-b", "public"] == 0.93 and pd.isna(t.loc["effnet-b", "private"])


def test_newer_schema_is_refused(tmp_path):
    db = tmp_path / "lb.db"
    LB.record(cfg_for(db), "train", time.time(), cv=0.5)
    con = sqlite3.connect(db)
    con.execute("UPDATE schema SET version = 99")
    con.commit()
    con.close()
    with pytest.raises(LB.LeaderboardError, match="schema version 99, newer"):
        LB.table(db)


def test_markdown_pattern_and_plots(tmp_path, capsys):
    db = tmp_path / "lb.db"
    for i, name in enumerate(["demo-a", "demo-b", "other"]):
        LB.record(cfg_for(db, name=name), "train", time.time(), cv=0.5 + i / 10,
                  epochs=[{"fold": 0, "epoch": e, "train_loss": 1 / e, "valid_loss": 1 / e, "score": e / 10}
                          for e in (1, 2, 3)])
        LB.record(cfg_for(db, name=name), "submit", time.time(), submission=f"submissions/{name}.csv")
        LB.set_score(db, name, 0.5 + i / 9, 0.5 + i / 11)
    md = tmp_path / "LB.md"
    assert main(["lb", "--pattern", "demo-%", "--markdown", str(md), f"leaderboard.path={db}"]) == 0
    text = md.read_text()
    assert text.startswith("| experiment |") and "demo-a" in text and "other" not in text
    paths = LB.plot(db, tmp_path, "demo-b")
    assert [p.name for p in paths] == ["lb_cv_vs_lb.png", "lb_scores.png", "lb_curves_demo-b.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_mlflow_logging_when_installed(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [f"leaderboard.path={tmp_path}/lb.db", "leaderboard.mlflow=true", "name=m"])
    LB.record(cfg, "train", time.time(), cv=0.7, folds={"fold0": 0.7})
    runs = mlflow.search_runs(experiment_names=["m"])
    assert len(runs) == 1 and runs["metrics.cv"].iloc[0] == 0.7


def test_the_predicted_submission_score_is_a_column_and_a_series_of_the_plot(tmp_path, capsys):
    from pipeline.store import plots

    db = tmp_path / "lb.db"
    LB.record(cfg_for(db, "rmse", "a"), "features", time.time(), cv=1.08, folds={"fold0": 1.07, "fold1": 1.09},
              predicted=1.012, predicted_how="exact: sqrt(CV MSE - test ambiguity)")
    LB.record(cfg_for(db, "rmse", "a"), "submit", time.time(), submission="submissions/a.csv")
    LB.set_score(db, "a", 1.0124, 1.0064)
    LB.record(cfg_for(db, "accuracy", "b"), "features", time.time(), cv=0.9, predicted=None, repeat_std=0.002)
    t = LB.table(db).set_index("experiment")
    assert t.loc["a", "predicted"] == 1.012 and t.loc["a", "how"] == "exact" and pd.isna(t.loc["b", "predicted"])
    assert t.loc["b", "repeat_std"] == 0.002
    text = LB.format_table(LB.table(db))
    assert "predicted sub" in text and "1.0120 (exact)" in text and "0.0020" in text
    fig = plots.scores_by_experiment(LB.table(db))
    labels = {line.get_label().split(" (")[0] for ax in fig.axes for line in ax.get_lines()}
    assert {"CV, one model", "predicted submission", "public LB", "private LB"} <= labels
    rmse_ax = next(ax for ax in fig.axes if ax.get_ylabel() == "rmse")
    legend = [t.get_text() for t in rmse_ax.get_legend().get_texts()]
    # the gap each number leaves to the LB (private here): CV 0.0736, the prediction 0.0056
    assert any("CV" in x and "0.0736" in x for x in legend) and any("predicted" in x and "0.0056" in x for x in legend)
