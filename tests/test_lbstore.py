"""The leaderboard's storage: schema migrations, URLs, and a server that cannot be reached (no server needed)."""
import socket
import sqlite3
import time

import pytest

from pipeline.__main__ import main
from pipeline.config.loading import load_config
from pipeline.errors import ConfigError
from pipeline.store import leaderboard as LB
from pipeline.store import leaderboard_db as lbstore


def test_a_version_1_database_is_migrated_and_keeps_its_rows(tmp_path):
    db = tmp_path / "lb.db"
    con = sqlite3.connect(db)
    con.executescript(lbstore.MIGRATIONS[1] + "; CREATE TABLE schema (version INTEGER NOT NULL);"
                      "INSERT INTO schema VALUES (1);"
                      "INSERT INTO runs (experiment, stage, metric, higher_is_better, cv) VALUES ('old', 'train', "
                      "'accuracy', 1, 0.7);")
    con.close()
    cfg = load_config(None, [f"leaderboard.path={db}", "name=new"])
    LB.record(cfg, "tune", time.time(), cv=0.8, trial=4, predicted=0.83, predicted_how="estimate: ...")
    con = sqlite3.connect(db)
    assert con.execute("SELECT version FROM schema").fetchall() == [(lbstore.SCHEMA_VERSION,)]
    assert con.execute("SELECT experiment, cv, trial FROM runs ORDER BY id").fetchall() == [("old", 0.7, None),
                                                                                         ("new", 0.8, 4)]
    assert list(LB.table(db)["experiment"]) == ["new", "old"]
    assert con.execute("SELECT predicted, predicted_how, repeat_std FROM runs ORDER BY id").fetchall() == [
        (None, None, None), (0.83, "estimate: ...", None)]


def test_a_sqlite_url_is_the_same_file(tmp_path):
    db = tmp_path / "team.db"
    cfg = load_config(None, [f"leaderboard.url=sqlite:///{db}", "name=a"])
    assert LB.db_path(cfg) == f"sqlite:///{db}"
    LB.record(cfg, "features", time.time(), cv=0.5)
    assert main(["lb", f"leaderboard.url=sqlite:///{db}"]) == 0
    assert list(LB.table(db)["experiment"]) == ["a"]  # the same rows through the plain path


def test_leaderboard_url_must_be_postgresql_or_sqlite():
    with pytest.raises(ConfigError, match=r"leaderboard.url = 'mysql://u@h/db': must be a SQLAlchemy URL"):
        load_config(None, ["leaderboard.url=mysql://u@h/db"])


def test_an_unreachable_server_is_a_user_error_that_hides_the_password(capsys):
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://me:secret@127.0.0.1:{port}/lb"
    assert main(["lb", f"leaderboard.url={url}"]) == 2
    err = capsys.readouterr().err
    assert "leaderboard.url postgresql://me:***@127.0.0.1" in err and "cannot connect" in err and "secret" not in err
