"""Files on disk: atomic writes, provenance (config hash, git commit), up-to-date checks."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml


def _jsonable(obj: Any) -> Any:
    """How JSON holds what it has no type for: a config section (pydantic) as its dict, anything else
    as its text."""
    dump = getattr(obj, "model_dump", None)
    return dump() if callable(dump) else str(obj)


def to_json(obj: Any, **kwargs) -> str:
    """``obj`` as JSON; config sections are written as their plain dicts (the same text, so the same
    hash, as the dict config they replaced)."""
    return json.dumps(obj, sort_keys=True, default=_jsonable, **kwargs)


def config_hash(obj: Any) -> str:
    """Stable short hash of a (sub-)config: canonical JSON, sorted keys."""
    blob = to_json(obj, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


_SECRET = re.compile(r"(://[^:/@\s]*):[^@/\s]*@")


def redact(obj: Any) -> Any:
    """``obj`` with every password in a URL (``postgresql://user:password@host/db``) replaced by ``***``:
    what is written to a file (saved configs, the leaderboard, the Kaggle bundle) or a log never holds one.
    The password belongs in PGPASSWORD or ~/.pgpass."""
    if callable(getattr(obj, "model_dump", None)):
        obj = obj.model_dump()
    if isinstance(obj, str):
        return _SECRET.sub(r"\1:***@", obj)
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def dump_yaml(cfg: dict) -> str:
    """A config as YAML, passwords in URLs hidden (every saved config goes through here)."""
    return yaml.safe_dump(redact(cfg), sort_keys=False)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_beside(path: str | Path) -> Path:
    """A new empty temporary file in ``path``'s folder (same filesystem, so a rename is atomic), with
    the mode a normal file gets under the umask (mkstemp alone makes 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    tmp_path = temp_beside(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, to_json(obj, indent=2) + "\n")


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def write_csv(path: str | Path, df, **kwargs) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kwargs)


def parquet_to(path: str | Path, df, metadata: dict | None = None) -> None:
    """Write a parquet file whose schema metadata carries ``metadata`` (provenance) as JSON."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta[b"pipeline"] = to_json(metadata).encode()
        table = table.replace_schema_metadata(meta)
    pq.write_table(table, path)


def write_parquet(path: str | Path, df, metadata: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        parquet_to(tmp, df, metadata)


def read_parquet_meta(path: str | Path) -> dict:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"pipeline", b"{}"))


def text_hash(text: str, n: int = 12) -> str:
    """The hash ``file_hash`` gives a file holding exactly this text (UTF-8)."""
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def file_hash(path: str | Path, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def git_info(cwd: str | Path | None = None) -> dict:
    """Commit and dirty flag of the checkout the pipeline's code comes from (whatever the current
    directory); 'unknown' when it is not a git checkout (an installed wheel, a Kaggle dataset)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": "unknown", "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def provenance(cfg: dict, stage: str, key: str, **extra) -> dict:
    """What every artifact carries: stage, config hash, the stage's input key, git commit, time."""
    return {
        "stage": stage,
        "experiment": cfg.get("name"),
        "config_hash": config_hash(cfg),
        "stage_key": key,
        "git": git_info(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def resolved_config_text(cfg: dict) -> str:
    return f"# resolved config, hash {config_hash(cfg)}\n" + dump_yaml(cfg)


def write_resolved_config(path: str | Path, cfg: dict) -> None:
    write_text(path, resolved_config_text(cfg))


def is_up_to_date(meta_path: str | Path, key: str, outputs: list[str | Path]) -> bool:
    """True when every output exists and the meta file records the same stage key."""
    meta_path = Path(meta_path)
    if not meta_path.exists() or not all(Path(p).exists() for p in outputs):
        return False
    try:
        return read_json(meta_path).get("stage_key") == key
    except (OSError, ValueError):
        return False


def log(msg: str) -> None:
    print(msg, flush=True)


def load_checkpoint(path: str | Path, mmap: bool = False) -> Any:
    """A ``.pt`` file as tensors and plain values, never running code: ``torch.load(weights_only=True)``.
    A file that holds pickled objects or code (a crafted checkpoint from a dataset or a teammate) and a
    file that is not a checkpoint at all are refused, naming the file; nothing in it is executed."""
    import pickle

    import torch

    from pipeline.errors import InputError, UnsafeCheckpoint

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        import re

        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"a pickled '{found.group(1)}'" if found else "pickled objects other than tensors and plain values"
        raise UnsafeCheckpoint(f"{path}: refused to load: it holds {what}; loading it could run code. Use a checkpoint "
                               "written by this pipeline or a plain state dict (torch.save(model.state_dict()) "
                               "or .safetensors)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise InputError(f"{path}: checkpoint not found") from None
        raise InputError(f"{path}: cannot be read as a PyTorch checkpoint ({str(exc).splitlines()[0][:160]}); "
                         "is it truncated or another kind of file?") from None


def files_fingerprint(paths, cache: str | Path | None = None) -> str:
    """One hash of the content of every file in ``paths`` (in order): a changed pixel changes it, a copy
    with new modification times does not. Each file's own hash is kept in ``cache`` (JSON, keyed by path,
    valid while the file's size and mtime stay), so a file is read once and afterwards only stat'ed."""
    known: dict = {}
    if cache is not None and Path(cache).exists():
        try:
            known = read_json(cache)
        except (OSError, ValueError):
            known = {}
    h, fresh, changed = hashlib.sha256(), {}, False
    for p in paths:
        key = os.path.abspath(p)  # (not resolve(): it costs a readlink per path component)
        try:
            st = os.stat(key)
        except FileNotFoundError:
            h.update(f"{p}:missing\n".encode())
            continue
        entry = known.get(key)
        if not entry or entry[0] != st.st_size or entry[1] != st.st_mtime_ns:
            entry, changed = [st.st_size, st.st_mtime_ns, file_hash(key, 20)], True
        fresh[key] = entry
        h.update(f"{os.path.basename(key)}:{entry[2]}\n".encode())
    if cache is not None and changed:
        try:
            write_json(cache, {**known, **fresh})
        except OSError:
            pass  # a read-only workspace: the hashes are recomputed next time
    return h.hexdigest()[:12]
