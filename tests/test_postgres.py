"""Against a real PostgreSQL server (a throwaway one, see tests/pgserver.py): the team leaderboard and a
tune study shared by several workers. Skipped, with the reason, where the server binaries are missing;
`apt-get install -y postgresql` enables them (CI installs it)."""
import time

import pytest
from pgserver import Server, unavailable

from pipeline.__main__ import main
from pipeline.store import leaderboard as LB
from tests.conftest import record_in_two_processes

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


@pytest.fixture(scope="module")
def pg():
    with Server() as server:
        yield server


def test_two_processes_recording_200_runs_each_lose_nothing(pg, tmp_path, capsys):
    url = pg.url("lb_writes")
    record_in_two_processes(f"leaderboard.url={url}")
    with LB.connect(url) as con:
        assert [tuple(r) for r in con.execute("SELECT experiment, COUNT(*) FROM runs GROUP BY experiment ORDER BY 1")
                .fetchall()] == [("p0", 200), ("p1", 200)]
        assert con.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 400
        assert con.execute("SELECT COUNT(DISTINCT id) FROM runs").fetchone()[0] == 400
    # the same `lb` commands as on SQLite
    LB.record(LB_cfg(url, "p0"), "submit", time.time(), submission="submissions/p0.csv")
    assert main(["lb", "set", "p0", "--public", "0.81", "--private", "0.79", f"leaderboard.url={url}"]) == 0
    md = tmp_path / "lb.md"
    assert main(["lb", "--pattern", "p%", "--markdown", str(md), f"leaderboard.url={url}"]) == 0
    t = LB.table(url)
    assert sorted(t["experiment"]) == ["p0", "p1"] and t["cv"].tolist() == [199 / 200] * 2  # full double precision
    p0 = t.set_index("experiment").loc["p0"]
    assert (p0["public"], p0["private"]) == (0.81, 0.79) and md.read_text().startswith("| experiment")
    assert main(["lb", "set", "nope", "--public", "1", f"leaderboard.url={url}"]) == 2
    assert "unknown experiment or submission 'nope'" in capsys.readouterr().err


def LB_cfg(url, name):
    from pipeline.config.loading import load_config

    return load_config(None, [f"leaderboard.url={url}", f"name={name}"])


def test_two_tune_workers_share_one_postgresql_study(pg, tmp_path):
    from optuna.trial import TrialState
    from tune_workers import logs, trials, tune_config, tune_rows, worker

    storage, lb = pg.url("optuna_shared"), pg.url("lb_tune")
    cfg_path = tune_config(tmp_path, "tune.trials=6", f"tune.storage={storage}", f"leaderboard.url={lb}")
    procs = [worker(cfg_path) for _ in range(2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0], logs(cfg_path)
    got = trials(storage)
    assert [t.number for t in got] == list(range(6)) and len({t.params["train.lr"] for t in got}) == 6
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in got)
    assert any(t.state == TrialState.PRUNED for t in got)
    assert tune_rows(lb) == [(k, f"tiny-trial{k:03d}") for k in range(6)]
    assert (tmp_path / "configs/tiny-best.yaml").exists() and not (tmp_path / "tune/tiny/study.db").exists()


def test_a_killed_worker_leaves_its_trial_failed_on_postgresql(pg, tmp_path):
    from optuna.trial import TrialState
    from tune_workers import logs, trials, tune_config, worker

    storage = pg.url("optuna_kill")
    cfg_path = tune_config(tmp_path, "tune.trials=1", "tune.heartbeat=1", "tune.grace=2", "tune.enqueue=[]",
                           f"tune.storage={storage}")
    assert worker(cfg_path, env={"PIPELINE_KILL_AT": "epoch:1"}).wait(timeout=300) == -9
    time.sleep(3)
    assert worker(cfg_path).wait(timeout=300) == 0, logs(cfg_path)
    states = [t.state for t in trials(storage)]
    assert states[0] == TrialState.FAIL and states[1] in (TrialState.COMPLETE, TrialState.PRUNED) and len(states) == 2
