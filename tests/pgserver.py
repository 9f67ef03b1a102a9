"""A throwaway PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` from Debian's ``postgresql`` package
(``apt-get install -y postgresql``), in a temporary folder, on a free localhost port, stopped after.

PostgreSQL refuses to run as root, so as root the server runs as the unprivileged ``postgres`` user
(created by the package) or ``nobody``. ``unavailable()`` says why no server can be started (the
tests then skip with that reason)."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

INSTALL = "apt-get install -y postgresql"


def _bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found and Path(found[-1]).with_name("initdb").exists() else None


def _user() -> str | None:
    if os.geteuid() != 0:
        return None  # run as ourselves
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


def unavailable() -> str | None:
    """Why a throwaway server cannot be started here (None when it can)."""
    if _bin() is None:
        return f"PostgreSQL server binaries (initdb, pg_ctl under /usr/lib/postgresql/*/bin) not installed; `{INSTALL}`"
    if os.geteuid() == 0 and (_user() is None or not shutil.which("runuser")):
        return "running as root with no unprivileged user (postgres or nobody) or no runuser to start PostgreSQL as"
    for mod in ("sqlalchemy", "psycopg", "optuna"):
        try:
            __import__(mod)
        except ImportError:
            return f"python package {mod} not installed (pip install -r requirements.txt)"
    return None


class Server:
    """``with Server() as pg: pg.url("dbname")`` -> a SQLAlchemy URL of a fresh database."""

    def __init__(self):
        self.bin, self.user = _bin(), _user()
        self.dir = Path(tempfile.mkdtemp(prefix="pgtest-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    def _run(self, *cmd: str) -> None:
        full = (["runuser", "-u", self.user, "--"] if self.user else []) + list(cmd)
        out = subprocess.run(full, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")

    def __enter__(self) -> Server:
        if self.user:
            shutil.chown(self.dir, self.user)
        data = self.dir / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start")
        return self

    def url(self, db: str) -> str:
        """A new, empty database on the server."""
        import sqlalchemy

        admin = sqlalchemy.create_engine(self._url("postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{db}"')
        admin.dispose()
        return self._url(db)

    def _url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def __exit__(self, *exc) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
