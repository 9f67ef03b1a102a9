"""Where the leaderboard's rows live: a SQLite file (default) or a team's PostgreSQL server.

``connect(location, write)`` yields a connection offering the sqlite3 calls the leaderboard makes
(``execute(sql, params)`` with ``?`` placeholders, ``executemany``), whichever the backend:

- a path (or a ``sqlite:///`` URL): SQLite in WAL mode; a write is an immediate transaction, retried
  while another process holds the lock. Safe for processes on ONE machine only: SQLite's locks live in
  the file system's byte-range locks and, in WAL mode, in shared memory (``-shm``), which network file
  systems (NFS, SMB, cloud mounts) do not share reliably between machines, so writers on two machines
  can both believe they hold the lock and corrupt the file. Machines of a team share a server instead:
- a ``postgresql://`` URL (SQLAlchemy; the password from ``PGPASSWORD`` or ``~/.pgpass``, never in
  the URL, which is saved with every config): every write transaction first takes one advisory lock,
  so writers on any number of machines queue as SQLite's do and nothing is lost.

Both hold the same tables (``MIGRATIONS``, applied in order under the write lock; types translated
per dialect, e.g. REAL -> DOUBLE PRECISION). SQLAlchemy and the driver are imported only for a URL.
"""
from __future__ import annotations

import os
import re
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import LeaderboardError
from pipeline.store.io import redact

SCHEMA_VERSION = 3
MIGRATIONS = {
    1: """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        experiment TEXT NOT NULL, stage TEXT NOT NULL, config_hash TEXT, config TEXT,
        git_commit TEXT, git_dirty INTEGER, started TEXT, ended TEXT, duration REAL,
        metric TEXT, higher_is_better INTEGER, cv REAL, cv_std REAL, folds TEXT,
        artifacts TEXT, submission TEXT, note TEXT);
    CREATE INDEX runs_experiment ON runs(experiment);
    CREATE TABLE epochs (
        run_id INTEGER REFERENCES runs(id), fold TEXT, epoch INTEGER,
        train_loss REAL, valid_loss REAL, score REAL);
    CREATE TABLE lb (
        submission TEXT PRIMARY KEY, experiment TEXT, public REAL, private REAL,
        source TEXT, description TEXT, updated TEXT);
    """,
    2: "ALTER TABLE runs ADD COLUMN trial INTEGER",  # the Optuna trial number of a `tune` run
    # what the fold-mean submission should score, how that was found, and the repeat-to-repeat CV spread
    3: """ALTER TABLE runs ADD COLUMN predicted REAL; ALTER TABLE runs ADD COLUMN predicted_how TEXT;
    ALTER TABLE runs ADD COLUMN repeat_std REAL""",
}
_DDL = {"postgresql": [(r"INTEGER PRIMARY KEY AUTOINCREMENT", "SERIAL PRIMARY KEY"), (r"\bREAL\b", "DOUBLE PRECISION")]}
_LOCK_KEY = 0x4C42_5752  # the server's advisory lock serialising leaderboard writers ("LBWR")


def is_url(location) -> bool:
    return isinstance(location, str) and "://" in location


def describe(location) -> str:
    """The location for a message, with any password in a URL hidden."""
    return redact(str(location))


@contextmanager
def connect(location, write: bool = False, retries: int = 200):
    """A connection to the leaderboard at ``location`` (a path or a URL); with ``write``, one
    transaction that holds the writers' lock (committed at the end of the block, rolled back on error)."""
    if is_url(location) and not location.startswith("sqlite"):
        with _server(location, write) as con:
            yield con
        return
    path = Path(location.split(":///", 1)[1]) if is_url(location) else Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA busy_timeout=60000")
            _migrate(con, path)
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc):
                raise
            raise LeaderboardError(f"{path}: not a readable leaderboard ({exc}); move it aside (mv {path} "
                                   f"{path}.broken) and rerun: a new, empty one is made") from None
        if not write:
            yield con
            return
        for attempt in range(retries):
            try:
                con.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == retries - 1:
                    raise
                time.sleep(0.05)
        try:
            yield con
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()


def _newer(where, version: int) -> LeaderboardError:
    return LeaderboardError(f"{where} has schema version {version}, newer than this pipeline's {SCHEMA_VERSION}; "
                            "upgrade the pipeline (or use another leaderboard.path) instead of downgrading it.")


def _apply(con, version: int, dialect: str) -> None:
    """Migrations after ``version``, then the version row (the caller holds the writers' lock)."""
    for v in range(version + 1, SCHEMA_VERSION + 1):
        for stmt in MIGRATIONS[v].split(";"):
            for pattern, repl in _DDL.get(dialect, []):
                stmt = re.sub(pattern, repl, stmt)
            if stmt.strip():
                con.execute(stmt)
    con.execute("DELETE FROM schema")
    con.execute("INSERT INTO schema VALUES (?)", (SCHEMA_VERSION,))


def _migrate(con: sqlite3.Connection, path: Path) -> None:
    con.execute("CREATE TABLE IF NOT EXISTS schema (version INTEGER NOT NULL)")
    row = con.execute("SELECT version FROM schema").fetchone()
    version = row[0] if row else 0
    if version > SCHEMA_VERSION:
        raise _newer(path, version)
    if version == SCHEMA_VERSION:
        return
    con.execute("BEGIN IMMEDIATE")
    try:
        row = con.execute("SELECT version FROM schema").fetchone()  # another process may have migrated
        _apply(con, row[0] if row else 0, "sqlite")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


# ------------------------------------------------------------------------------ server (SQLAlchemy)
_ENGINES: dict = {}
_READY: set = set()


def _native(v):
    """numpy scalars as Python numbers (drivers adapt only the latter)."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v


class ServerConnection:
    """The sqlite3 calls the leaderboard makes, on a SQLAlchemy connection (``?`` -> the driver's ``%s``)."""

    def __init__(self, conn):
        self.conn = conn

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def execute(self, sql: str, params=()):
        return self.conn.exec_driver_sql(self._sql(sql), tuple(_native(p) for p in params))

    def executemany(self, sql: str, rows) -> None:
        rows = [tuple(_native(p) for p in r) for r in rows]
        if rows:
            self.conn.exec_driver_sql(self._sql(sql), rows)


def _engine(url: str):
    key = (os.getpid(), url)  # a forked worker must not reuse its parent's pooled connections
    if key not in _ENGINES:
        try:
            import sqlalchemy
        except ImportError:
            raise LeaderboardError("leaderboard.url needs SQLAlchemy and a PostgreSQL driver: "
                                   "pip install sqlalchemy 'psycopg[binary]' (pinned in requirements.txt).") from None
        try:
            _ENGINES[key] = sqlalchemy.create_engine(url, pool_pre_ping=True)
        except (ImportError, sqlalchemy.exc.ArgumentError) as exc:
            raise LeaderboardError(f"leaderboard.url {describe(url)} cannot be used ({exc}); install the "
                                   "driver (pip install 'psycopg[binary]') or fix the URL, e.g. "
                                   "postgresql://user@host:5432/db.") from None
    return _ENGINES[key]


@contextmanager
def _server(url: str, write: bool):
    import sqlalchemy

    engine = _engine(url)
    try:
        conn = engine.connect()
    except sqlalchemy.exc.DBAPIError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise LeaderboardError(f"leaderboard.url {describe(url)}: cannot connect ({reason}); start the server or fix "
                               "the URL (the password comes from PGPASSWORD or ~/.pgpass).") from None
    with conn:
        if (os.getpid(), url) not in _READY:
            with conn.begin():
                con = ServerConnection(conn)
                con.execute("SELECT pg_advisory_xact_lock(?)", (_LOCK_KEY,))
                con.execute("CREATE TABLE IF NOT EXISTS schema (version INTEGER NOT NULL)")
                row = con.execute("SELECT version FROM schema").fetchone()
                version = row[0] if row else 0
                if version > SCHEMA_VERSION:
                    raise _newer(describe(url), version)
                if version < SCHEMA_VERSION:
                    _apply(con, version, "postgresql")
            _READY.add((os.getpid(), url))
        with conn.begin():
            con = ServerConnection(conn)
            if write:
                con.execute("SELECT pg_advisory_xact_lock(?)", (_LOCK_KEY,))
            yield con


def insert_id(con, sql: str, params) -> int:
    """Run an ``INSERT`` into a table with an ``id`` column; the new row's id."""
    if isinstance(con, ServerConnection):
        return int(con.execute(sql + " RETURNING id", params).scalar_one())
    return con.execute(sql, params).lastrowid


def frame(con, sql: str, params=()):
    """A query's rows as a DataFrame (as ``pandas.read_sql_query``), on either backend."""
    import pandas as pd

    cur = con.execute(sql, params)
    cols = list(cur.keys()) if isinstance(con, ServerConnection) else [d[0] for d in cur.description]
    return pd.DataFrame.from_records([tuple(r) for r in cur.fetchall()], columns=cols, coerce_float=True)
