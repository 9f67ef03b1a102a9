"""``make data``: build the bundled demo competition offline from scikit-learn's digits.

1,797 8x8 digit images become 32x32 grayscale PNGs; rows are dealt to 60 pseudo-writers (the group
column), whole writers go to test (as in a real grouped competition), each writer belongs to a
``series`` (a tabular column), and ``solution.csv`` holds the test labels with a Kaggle-style
Public/Private ``Usage`` column for local scoring. Deterministic; nothing is downloaded.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from .io import file_hash, log, write_csv, write_json

N_WRITERS = 60
TEST_WRITERS = 12
SIZE = 32
VERSION = 1


def build(out_dir: str | Path = "data/demo", seed: int = 0, force: bool = False) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    stamp = out_dir / "demo.json"
    if stamp.exists() and not force:
        log(f"[data] up to date: {out_dir} (delete it or pass --force to rebuild)")
        return out_dir
    digits = load_digits()
    rng = np.random.default_rng(seed)
    n = len(digits.target)
    ids = [f"d{i:04d}" for i in range(n)]
    writer = rng.permutation(np.arange(n) % N_WRITERS)
    series = np.where(writer % 3 == 0, "census", "school")
    df = pd.DataFrame({"id": ids, "target": digits.target, "writer": writer, "series": series})

    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
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
    write_json(tmp_dir / "demo.json", {"version": VERSION, "seed": seed, "train_rows": len(train),
                                       "test_rows": len(test), "train_csv": file_hash(tmp_dir / "train.csv")})
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
    log(f"[data] wrote {out_dir}: {len(train)} train rows, {len(test)} test rows, {N_WRITERS} writers")
    return out_dir


def run(cfg: dict, force: bool = False) -> Path:
    """Stage entry point: build the demo competition; any other competition's data is the user's."""
    root = Path(cfg["competition"]["root"])
    if cfg["competition"]["name"] != "demo":
        state = "found" if (root / cfg["competition"]["train"]).exists() else "NOT found: link or copy it there"
        log(f"[data] competition '{cfg['competition']['name']}' is not the demo; nothing to build ({root} {state})")
        return root
    return build(root, force=force)

