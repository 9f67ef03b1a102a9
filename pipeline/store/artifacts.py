"""A stage's outputs as one consistent group: staged, then committed under a lock, marked by meta.json.

Every stage that writes several files (a folds file and its report, a feature set's oof/test/cv,
a submission and its summary) writes them through an ``ArtifactGroup``:

1. each file is written in full to a temporary name beside its target (a failing write, e.g. a full
   disk, leaves the previous artifact untouched and still valid);
2. on commit, the group's ``meta.json`` (the marker that says "complete, made by stage key K") is
   removed, every file is renamed into place, and the new ``meta.json`` is written last.

A reader accepts a group only when its ``meta.json`` exists and every file's embedded key matches it
(``require_complete``), so a run killed half-way through a commit is seen as "not up to date" and
is never read. ``stage_lock`` serialises two processes writing the same group.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.store.io import atomic_path, parquet_to, read_json, read_parquet_meta, temp_beside, to_json


def kill_point(name: str) -> None:
    """Test hook: ``PIPELINE_KILL_AT=<name>`` sends this process SIGKILL here (fault tests)."""
    if os.environ.get("PIPELINE_KILL_AT", "") == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def stage_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock (flock) held while a stage checks and writes one group. The lock file lives in
    the temp folder, keyed by the group's absolute path, so nothing is created beside the outputs (and
    nothing at all when the stage fails on bad input)."""
    import hashlib
    import tempfile

    name = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:20]
    # one folder per user: another user's lock folder on a shared machine is not writable for us
    lock = Path(tempfile.gettempdir()) / f"pipeline-locks-{os.getuid()}" / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ArtifactGroup:
    """Files staged by ``add``/``parquet``/``json``/``text``/``csv``/``figure``, committed together."""

    def __init__(self, meta_path: str | Path):
        self.meta_path = Path(meta_path)
        self._staged: list[tuple[Path, Path]] = []  # (temporary file, target)

    def add(self, target: str | Path, write) -> Path:
        """Stage one file: ``write(tmp_path)`` fills a temporary file that becomes ``target`` on commit.
        Returns the staged file (readable until the commit, e.g. to check what was written)."""
        target = Path(target)
        tmp = temp_beside(target)
        self._staged.append((tmp, target))
        write(tmp)
        return tmp

    def parquet(self, target, df, metadata: dict | None = None) -> Path:
        return self.add(target, lambda tmp: parquet_to(tmp, df, metadata))

    def json(self, target, obj: Any) -> Path:
        return self.add(target, lambda tmp: tmp.write_text(to_json(obj, indent=2) + "\n"))

    def text(self, target, text: str) -> Path:
        return self.add(target, lambda tmp: tmp.write_text(text))

    def csv(self, target, df, **kwargs) -> Path:
        return self.add(target, lambda tmp: df.to_csv(tmp, index=False, **kwargs))

    def figure(self, target, fig) -> Path:
        import matplotlib.pyplot as plt

        def save(tmp):
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
            plt.close(fig)

        return self.add(target, save)

    def commit(self, meta: dict) -> None:
        """Replace the previous group: marker off, files into place, marker (``meta``) on."""
        if self.meta_path.exists():
            self.meta_path.unlink()
        for i, (tmp, target) in enumerate(self._staged):
            os.replace(tmp, target)
            kill_point(f"commit:{i + 1}")
        with atomic_path(self.meta_path) as tmp:
            tmp.write_text(to_json(meta, indent=2) + "\n")
        self._staged = []

    def __enter__(self) -> ArtifactGroup:
        return self

    def __exit__(self, *exc) -> None:
        for tmp, _ in self._staged:  # not committed (an error): the previous group stays as it was
            if tmp.exists():
                tmp.unlink()


def require_complete(folder: str | Path, files: list[str], what: str, fix: str) -> dict:
    """The meta of a complete group, or an InputError when it is missing or its files do not match it
    (an interrupted or concurrent run): such files are never read."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    missing = [f for f in files if not (folder / f).exists()]
    if missing and not meta_path.exists():
        raise InputError(f"{folder}: no {what}; {fix}.")
    if not meta_path.exists() or missing:
        raise InputError(f"{folder}: {what} are incomplete (an interrupted run?); {fix}.")
    meta = read_json(meta_path)
    for f in files:
        if f.endswith(".parquet") and read_parquet_meta(folder / f).get("stage_key") != meta.get("stage_key"):
            raise InputError(f"{folder / f} does not belong to {meta_path} (an interrupted or concurrent run); {fix}.")
    return meta


def inherited_leak(metas: dict[str, dict]) -> str | None:
    """The LEAKY mark an artifact takes from its inputs' metadata (their ``leak`` field): whatever is built on
    a leaky experiment (level 2, post-processing, a student of a leaky teacher) is leaky too."""
    for name, meta in metas.items():
        why = (meta or {}).get("leak")
        if why:
            return f"LEAKY: built on {name} ({str(why).removeprefix('LEAKY: ')})"
    return None
