"""``make data``: build the bundled demo competition offline from scikit-learn's digits.

1,797 8x8 digit images become 32x32 grayscale PNGs; rows are dealt to 60 pseudo-writers (the group
column), whole writers go to test (as in a real grouped competition), each writer belongs to a
``series`` (a tabular column), and ``solution.csv`` holds the test labels with a Kaggle-style
Public/Private ``Usage`` column for local scoring. Deterministic; nothing is downloaded.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.errors import InputError
from pipeline.store.artifacts import stage_lock
from pipeline.store.io import file_hash, log, read_json, write_csv, write_json

if TYPE_CHECKING:
    from pipeline.config.schema import Config

N_WRITERS = 60
TEST_WRITERS = 12
SIZE = 32
VERSION = 1


# demo.json's "generator": what makes a folder this generator's own (the module's name before the package had
# folders, kept so that demo folders made before stay ours)
MARK = "pipeline.demo"


def _is_ours(folder: Path) -> bool:
    try:
        stamp = read_json(folder / "demo.json")
    except (OSError, ValueError):
        return False
    legacy = {"version", "seed", "train_rows", "test_rows", "train_csv"}  # the stamp before "generator" existed
    return isinstance(stamp, dict) and (stamp.get("generator") == MARK or set(stamp) == legacy)


def _write(tmp_dir: Path, seed: int) -> dict:
    """The demo competition into ``tmp_dir`` (a fresh folder of ours); returns demo.json's content."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    n = len(digits.target)
    ids = [f"d{i:04d}" for i in range(n)]
    writer = rng.permutation(np.arange(n) % N_WRITERS)
    series = np.where(writer % 3 == 0, "census", "school")
    df = pd.DataFrame({"id": ids, "target": digits.target, "writer": writer, "series": series})
    (tmp_dir / "images").mkdir(parents=True)
    for row_id, img in zip(ids, digits.images):
        arr = (img / 16.0 * 255).astype(np.uint8)
        Image.fromarray(arr, mode="L").resize((SIZE, SIZE), Image.BILINEAR).save(tmp_dir / "images" / f"{row_id}.png")
    is_test = df["writer"] >= N_WRITERS - TEST_WRITERS
    train = df[~is_test].reset_index(drop=True)
    test = df[is_test].reset_index(drop=True)
    write_csv(tmp_dir / "train.csv", train)
    write_csv(tmp_dir / "test.csv", test[["id", "writer", "series"]])
    write_csv(tmp_dir / "sample_submission.csv", pd.DataFrame({"id": test["id"], "target": 0}))
    usage = np.where(rng.random(len(test)) < 0.5, "Public", "Private")
    write_csv(tmp_dir / "solution.csv", pd.DataFrame({"id": test["id"], "target": test["target"], "Usage": usage}))
    return {"generator": MARK, "version": VERSION, "seed": seed, "train_rows": len(train), "test_rows": len(test),
            "train_csv": file_hash(tmp_dir / "train.csv"), "files": ["images"] + FILES}


FILES = ["train.csv", "test.csv", "sample_submission.csv", "solution.csv"]


def build(out_dir: str | Path = "data/demo", seed: int = 0, force: bool = False) -> Path:
    """Write the demo competition into ``out_dir``. The generator only ever writes into a folder that does
    not exist yet, an empty one, or one it made itself (``demo.json`` says so); it deletes nothing but
    files of its own, and two concurrent runs serialise on a lock (the second finds it up to date)."""
    out_dir = Path(out_dir)
    with stage_lock(out_dir):
        if _is_ours(out_dir) and not force:
            log(f"[data] up to date: {out_dir} (pass --force to rebuild)")
            return out_dir
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(f"competition.root={out_dir} is a file, not a folder; the demo needs a new or "
                             "empty folder: set competition.root to another path")
        if out_dir.is_dir() and any(out_dir.iterdir()) and not _is_ours(out_dir):
            raise InputError(f"competition.root={out_dir} holds files the demo generator did not write (no "
                             "demo.json of its own); it never writes into or deletes such a folder: set "
                             "competition.root to a new or empty folder (e.g. data/demo)")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        try:
            stamp = _write(tmp_dir, seed)
            if out_dir.is_dir():  # empty, or ours: replace our own files one by one, the marker last
                (out_dir / "demo.json").unlink(missing_ok=True)
                (out_dir / "images").mkdir(exist_ok=True)
                for f in (tmp_dir / "images").iterdir():
                    os.replace(f, out_dir / "images" / f.name)
                for name in FILES:
                    os.replace(tmp_dir / name, out_dir / name)
                write_json(out_dir / "demo.json", stamp)
            else:
                write_json(tmp_dir / "demo.json", stamp)
                os.rename(tmp_dir, out_dir)
        finally:
            if tmp_dir.exists():  # our own scratch folder (made by mkdtemp above): nothing else is removed
                shutil.rmtree(tmp_dir)
    log(f"[data] wrote {out_dir}: {stamp['train_rows']} train rows, {stamp['test_rows']} test rows, "
        f"{N_WRITERS} writers")
    return out_dir


def run(cfg: Config, force: bool = False) -> Path:
    """Stage entry point: build the demo competition; any other competition's data is the user's."""
    root = Path(cfg.competition.root)
    if cfg.competition.name != "demo":
        state = "found" if (root / cfg.competition.train).exists() else "NOT found: link or copy it there"
        log(f"[data] competition '{cfg.competition.name}' is not the demo; nothing to build ({root} {state})")
        return root
    return build(root, force=force)

