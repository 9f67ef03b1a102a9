"""Label sets (``competition.task: multilabel``): any number of labels per row, written by a competition
either as one 0/1 column per label (``competition.target: [a, b, c]``) or as one column of space-separated
labels (``competition.target: labels``, cells like ``"cat dog"``; an empty cell is the empty set).

The stages see one form only: a 0/1 matrix with a column per label, in the order of ``names``. The
space-separated column is expanded into columns ``<target>:<label>`` on loading (``expand``), and a
submission is written back in the competition's own form (``write``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import InputError


def tokens(cell) -> list[str]:
    """The labels of one cell: whitespace-separated; a blank or missing cell has none."""
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return []
    if isinstance(cell, (int, np.integer)) or (isinstance(cell, (float, np.floating)) and float(cell).is_integer()):
        return [str(int(cell))]  # a column of single numeric labels is read as numbers: 1.0 is label '1'
    return str(cell).split()


def vocabulary(column: pd.Series, where: str = "the label column") -> list[str]:
    """Every label that occurs, sorted (numerically when every label is a number: 2 before 10). A label with a
    comma or semicolon in it is refused: the column is space-separated, and "a,b" would be one label."""
    found = {t for cell in column for t in tokens(cell)}
    odd = sorted(t for t in found if "," in t or ";" in t)
    if odd:
        line = next(i for i, cell in enumerate(column) if odd[0] in tokens(cell)) + 2
        raise InputError(f"{where}: label '{odd[0]}' at line {line} holds a separator; labels in competition.target "
                         "are separated by spaces (write 'a b', not 'a,b'): fix the file, or give one 0/1 column "
                         "per label.")
    numeric = all(t.lstrip("-").isdigit() for t in found)
    return sorted(found, key=(lambda t: (int(t), t)) if numeric else None)


def expanded_columns(target: str, names: list[str]) -> list[str]:
    return [f"{target}:{n}" for n in names]


def matrix(column: pd.Series, names: list[str], where: str) -> np.ndarray:
    """(rows, labels) 0/1 from a space-separated column; a label outside ``names`` is an error naming it."""
    index = {n: j for j, n in enumerate(names)}
    out = np.zeros((len(column), len(names)), dtype=np.int64)
    for i, cell in enumerate(column):
        for t in tokens(cell):
            if t not in index:
                raise InputError(f"{where}: label '{t}' at line {i + 2} is not among the train labels "
                                 f"({', '.join(names[:8])}{'...' if len(names) > 8 else ''}).")
            out[i, index[t]] = 1
    return out


def expand(df: pd.DataFrame, target: str, names: list[str], path: Path) -> pd.DataFrame:
    """The train table with one 0/1 column per label added (``<target>:<label>``)."""
    m = matrix(df[target], names, str(path))
    return df.assign(**dict(zip(expanded_columns(target, names), m.T)))


def check(df: pd.DataFrame, columns: list[str], path: Path, how: str) -> None:
    """The label columns hold 0/1 and none of them is the same in every row (nothing to learn, no AUC)."""
    if len(columns) < 2:
        raise InputError(f"{path}: a label set needs at least 2 labels, {how} gives {len(columns)} "
                         f"({', '.join(columns)}); for one yes/no target use competition.task=binary.")
    for c in columns:
        v = pd.to_numeric(df[c], errors="coerce")
        bad = v.isna() | ~v.isin([0, 1])
        if bad.any():
            lines = np.flatnonzero(bad.to_numpy()) + 2
            where = f"line(s) {', '.join(map(str, lines[:5]))}{', ...' if len(lines) > 5 else ''}"
            value = "an empty cell (NaN)" if pd.isna(df[c].iloc[lines[0] - 2]) else repr(str(df[c].iloc[lines[0] - 2]))
            raise InputError(f"{path}: label column '{c}' must hold 0 or 1 (task multilabel), but has {value} at "
                             f"{where}.")
        if v.nunique() < 2:
            raise InputError(f"{path}: label '{c}' is {'present' if v.iloc[0] else 'absent'} in all {len(v)} rows; "
                             "nothing can be learnt about it: drop it from competition.target (or the file).")


def write(p: np.ndarray, names: list[str]) -> list[str]:
    """Each row's labels with probability >= 0.5 (post-processing moves every label's own threshold there),
    space-separated in ``names`` order; a row with none is the empty string, exactly what the CV scored."""
    on = np.asarray(p, dtype=float) >= 0.5
    return [" ".join(n for n, x in zip(names, row) if x) for row in on]
