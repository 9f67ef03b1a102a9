"""Competitions whose train images are sorted into class folders (``train/<label>/*.jpg``): indexed into a
``train.csv`` with an id, the label and each image's path, which ``competition.path_column`` then reads.

    python -m pipeline index data/flowers --folder train      # writes data/flowers/train.csv
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.errors import InputError
from pipeline.store.io import write_csv

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def index_class_folders(root: str | Path, folder: str = "train", out: str = "train.csv", id_col: str = "id",
                        target: str = "label", path_col: str = "path") -> Path:
    """``<root>/<out>``: one row per image under ``<root>/<folder>/<label>/`` (sorted, so the index is the
    same on every machine); the id is the path without its suffix, unique across labels."""
    base = Path(root) / folder
    if not base.is_dir():
        raise InputError(f"{base}: no such folder; name the folder that holds one sub-folder per class (--folder)")
    rows = [(str(p.relative_to(Path(root)).with_suffix("")), label.name, str(p.relative_to(Path(root))))
            for label in sorted(d for d in base.iterdir() if d.is_dir())
            for p in sorted(label.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not rows:
        raise InputError(f"{base}: no images in class sub-folders ({base}/<label>/*.jpg)")
    path = Path(root) / out
    write_csv(path, pd.DataFrame(rows, columns=[id_col, target, path_col]))
    return path
