"""The competition as files: train/test/sample submission tables, the images they name, and the
folds file every stage after ``folds`` reads (``load_folds``, ``fold_of``, ``fold_matrix`` with repeats).

Every loader validates what it reads and raises ``InputError`` naming the file, the column or the
rows at fault, and what to do about it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.competition import label_sets
from pipeline.errors import InputError
from pipeline.store.io import file_hash
from pipeline.store.paths import folds_file, targets
from pipeline.tasks import get_task

if TYPE_CHECKING:
    from pipeline.config.schema import Config


def root(cfg: Config) -> Path:
    return Path(cfg.competition.root)


def table_path(cfg: Config, which: str) -> Path:
    return root(cfg) / cfg.competition[which]


SPLITS = ("train", "test")
ADDED = ("train_image", "test_image", "path_column")  # competition keys added later, None by default


def competition_key(comp: dict) -> dict:
    """The competition section as stage keys hash it: keys added later are left out while unset, so the
    folds, models and feature sets made before they existed stay up to date."""
    return {k: v for k, v in dict(comp).items() if not (k in ADDED and v is None)}


def image_pattern(cfg: Config, split: str) -> str:
    comp = cfg.competition
    return comp.get(f"{split}_image") or comp.image


def _path_column(cfg: Config, split: str) -> dict | None:
    """{id: path} from the split's table's ``competition.path_column`` (read once per table version), or
    None when a test table lacks the column (a class-folder index has it in train.csv only: the test images
    then follow the split's pattern)."""
    comp, table = cfg.competition, table_path(cfg, split)
    stamp = (str(table), table.stat().st_mtime_ns if table.exists() else None, comp.path_column)
    if _PATHS.get(split, (None,))[0] != stamp:
        df = read_table(table, split, comp.id)
        if split == "test" and comp.path_column not in df.columns:
            _PATHS[split] = (stamp, None)
            return None
        require_columns(df, table, [comp.path_column], "competition.path_column")
        empty = df[comp.path_column].isna()
        if empty.any():
            raise InputError(f"{table}: column '{comp.path_column}' (competition.path_column) is empty at "
                             f"{_rows(np.flatnonzero(empty))}; every row needs its image's path")
        _PATHS[split] = (stamp, dict(zip(df[comp.id].astype(str), df[comp.path_column].astype(str))))
    return _PATHS[split][1]


_PATHS: dict = {}


def image_path(cfg: Config, row_id, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    paths = _path_column(cfg, split) if cfg.competition.path_column else None
    if paths is not None:
        return root(cfg) / paths[str(row_id)]
    return root(cfg) / image_pattern(cfg, split).format(id=row_id, split=split)


def image_paths(cfg: Config, ids, split: str) -> list[Path]:
    """Each row's image file: ``split`` (train or test) picks the pattern, or the table of the path column."""
    return [image_path(cfg, i, split) for i in ids]


def _rows(index, limit: int = 5) -> str:
    """Spreadsheet-style row numbers (header = line 1) of the first few offending rows."""
    idx = list(index)
    shown = ", ".join(str(i + 2) for i in idx[:limit])
    more = f" and {len(idx) - limit} more" if len(idx) > limit else ""
    return f"line(s) {shown}{more}"


def read_table(path: Path, what: str, id_col: str) -> pd.DataFrame:
    if not path.exists():
        raise InputError(f"{path}: {what} file not found; check competition.root and competition.{what} in the config"
                         " (run `make data` for the demo competition).")
    try:
        df = pd.read_csv(path, dtype={id_col: str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as CSV ({exc}); fix the file.") from exc
    if id_col not in df.columns:
        raise InputError(f"{path}: id column '{id_col}' is missing (columns: {', '.join(df.columns)}); "
                         "set competition.id to the right column.")
    dup = df[id_col].duplicated(keep=False)
    if dup.any():
        first = df.loc[dup, id_col].iloc[0]
        raise InputError(f"{path}: id column '{id_col}' has duplicate ids (e.g. '{first}' at "
                         f"{_rows(np.flatnonzero(df[id_col].to_numpy() == first))}); ids must be unique.")
    if df[id_col].isna().any():
        raise InputError(f"{path}: id column '{id_col}' is empty at {_rows(np.flatnonzero(df[id_col].isna()))}.")
    if df.empty:
        raise InputError(f"{path}: the {what} table has a header but no rows; a competition needs rows to "
                         f"{'train on' if what == 'train' else 'predict'}.")
    return df


def require_columns(df: pd.DataFrame, path: Path, columns: list[str], key: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{path}: column(s) {', '.join(repr(c) for c in missing)} named by {key} are missing "
                         f"(columns: {', '.join(df.columns)}); fix {key} in the config or the file.")


def load_train(cfg: Config, check_images: bool | None = None) -> pd.DataFrame:
    comp = cfg.competition
    path = table_path(cfg, "train")
    df = read_table(path, "train", comp.id)
    tgt = targets(cfg)
    require_columns(df, path, tgt, "competition.target")
    require_columns(df, path, aux_columns(cfg), "competition.aux_targets")
    require_columns(df, path, list(comp.tabular), "competition.tabular")
    if get_task(comp.task).label_sets:
        return _label_set_train(cfg, df, path, check_images)
    labels = class_labels(cfg)
    if labels is not None:  # string class labels: train on their index; submit maps them back
        df = encode_labels(df, tgt[0], labels, path)
    for col in tgt:
        bad = df[col].isna()
        if bad.any():
            raise InputError(f"{path}: target column '{col}' is empty (NaN) at {_rows(np.flatnonzero(bad))}; "
                             "drop or fill those rows before training.")
    if get_task(comp.task).classes:
        for col in tgt:
            vals = df[col]
            nonint = ~np.isclose(vals.astype(float), np.round(vals.astype(float)))
            if nonint.any():
                raise InputError(f"{path}: target column '{col}' must hold integer class labels for task "
                                 f"'{comp.task}', but has {vals[nonint].iloc[0]!r} at {_rows(np.flatnonzero(nonint))}.")
            if vals.nunique() < 2:
                raise InputError(f"{path}: target column '{col}' holds one class only ({vals.iloc[0]!r} in all "
                                 f"{len(vals)} rows); there is nothing to learn and every score would be perfect: "
                                 "check competition.target and the file.")
            n_classes = comp.num_classes
            if n_classes is not None:
                out = (vals < 0) | (vals >= n_classes)
                if out.any():
                    raise InputError(f"{path}: target column '{col}' has {vals[out].iloc[0]!r} at "
                                     f"{_rows(np.flatnonzero(out))}, outside the declared classes 0..{n_classes - 1} "
                                     "(competition.num_classes).")
    return _checked_rows(cfg, df, path, check_images)


def _checked_rows(cfg: Config, df: pd.DataFrame, path: Path, check_images: bool | None) -> pd.DataFrame:
    """The group column and the images of every train row."""
    comp = cfg.competition
    group = comp.group
    if group:
        require_columns(df, path, [group], "competition.group")
        bad = df[group].isna()
        if bad.any():
            raise InputError(f"{path}: group column '{group}' is empty (NaN) at {_rows(np.flatnonzero(bad))}; "
                             "give every row a group (e.g. its own id) so folds can keep groups together.")
    if comp.check_images if check_images is None else check_images:
        check_image_files(cfg, df[comp.id], path, "exists")
    return df


def _label_set_train(cfg: Config, df: pd.DataFrame, path: Path, check_images: bool | None = None) -> pd.DataFrame:
    """A label-set train table: a space-separated column expanded into 0/1 columns, then checked."""
    target = cfg.competition.target
    if isinstance(target, str):
        df = label_sets.expand(df.assign(**{target: label_text(path, target)}), target, label_names(cfg), path)
    label_sets.check(df, label_columns(cfg), path, "competition.target")
    return _checked_rows(cfg, df, path, check_images)


_LABELS: dict = {}


def label_text(path: Path, column: str) -> pd.Series:
    """A space-separated label column as written: a label called NA, None or null is a label, not a missing
    cell (only an empty cell is the empty set)."""
    return pd.read_csv(path, usecols=[column], dtype=str, keep_default_na=False)[column]


def label_names(cfg: Config) -> list[str]:
    """A label set's labels, in the order of the model's outputs: the 0/1 target columns, or every label the
    train table's space-separated target column holds (sorted)."""
    target = cfg.competition.target
    if not isinstance(target, str):
        return list(target)
    path = table_path(cfg, "train")
    stamp = (str(path), path.stat().st_mtime_ns if path.exists() else None, target)
    if _LABELS.get("train", (None,))[0] != stamp:
        column = label_text(path, target) if path.exists() else pd.Series([], dtype=str)
        _LABELS["train"] = (stamp, label_sets.vocabulary(column, str(path)))
    return _LABELS["train"][1]


def label_columns(cfg: Config) -> list[str]:
    """The train table's columns (after ``load_train``) that the main head predicts."""
    target = cfg.competition.target
    if not get_task(cfg.competition.task).label_sets:
        return targets(cfg)[:1]
    return label_sets.expanded_columns(target, label_names(cfg)) if isinstance(target, str) else list(target)


def label_matrix(cfg: Config, df: pd.DataFrame, where) -> np.ndarray:
    """A table's label sets as the model's outputs, (rows, labels) in label order: from the 0/1 (or
    probability) columns, or from the space-separated column (a solution or a submission file)."""
    target = cfg.competition.target
    if isinstance(target, str):
        return label_sets.matrix(df[target], label_names(cfg), str(where)).astype(float)
    require_columns(df, Path(str(where)), list(target), "competition.target")
    return df[list(target)].to_numpy(dtype=float)


def truth(cfg: Config, df: pd.DataFrame) -> np.ndarray:
    """The main target of a loaded train table: (rows,), or (rows, labels) 0/1 for a label set."""
    if get_task(cfg.competition.task).label_sets:
        return df[label_columns(cfg)].to_numpy(dtype=np.int64)
    return df[targets(cfg)[0]].to_numpy()


def aux_columns(cfg: Config) -> list[str]:
    """Columns named by competition.aux_targets (a column name, or a mapping with name/columns)."""
    cols = []
    for aux in cfg.competition.aux_targets:
        if isinstance(aux, str):
            cols.append(aux)
        elif isinstance(aux, dict) and (aux.get("columns") or aux.get("name")):
            cols += list(aux.get("columns") or [aux["name"]])
        else:
            raise InputError(f"competition.aux_targets: {aux!r} must be a column name or a mapping with 'name' "
                             "and optionally 'columns', 'task' (regression, multiclass, binary, vector), 'weight'.")
    return cols


def load_test(cfg: Config, check_images: bool | None = None) -> pd.DataFrame:
    comp = cfg.competition
    path = table_path(cfg, "test")
    df = read_table(path, "test", comp.id)
    require_columns(df, path, list(comp.tabular), "competition.tabular")
    if comp.check_images if check_images is None else check_images:
        check_image_files(cfg, df[comp.id], path, "exists", "test")
    return df


def check_image_files(cfg: Config, ids, table: Path, mode="exists", split: str = "train") -> None:
    """Every id's image: ``exists`` (the file is there), ``header`` (PIL reads its header: a fast check
    that it is an image), or ``decode`` (every pixel is decoded). The first failures are named."""
    mode = "header" if mode is True else mode
    missing = [i for i in ids if not image_path(cfg, i, split).exists()]
    if missing:
        where = (f"competition.path_column ('{cfg.competition.path_column}')" if cfg.competition.path_column
                 else f"competition.{split}_image / competition.image ('{image_pattern(cfg, split)}')")
        example = image_path(cfg, missing[0], split)
        raise InputError(f"{table}: {len(missing)} id(s) have no image file, e.g. id '{missing[0]}' -> {example} "
                         f"(first: {', '.join(map(str, missing[:5]))}); check {where} or add the images.")
    if mode not in ("header", "decode"):
        return
    from PIL import Image
    from tqdm.auto import tqdm

    broken = []
    for i in tqdm(list(ids), desc=f"images ({mode} check)", leave=False, mininterval=1):
        path = image_path(cfg, i, split)
        try:
            with Image.open(path) as img:
                img.load() if mode == "decode" else img.size
        except Exception as exc:  # PIL raises many types for a bad file
            broken.append((i, path, exc))
            if len(broken) >= 5:
                break
    if broken:
        i, path, exc = broken[0]
        raise InputError(f"{table}: image of id '{i}' ({path}) cannot be read ({type(exc).__name__}: {exc}); "
                         f"{len(broken)}{'+' if len(broken) >= 5 else ''} broken, first ids: "
                         f"{', '.join(str(b[0]) for b in broken)}. Replace those files or drop their rows.")


def class_labels(cfg: Config) -> list | None:
    """The original class labels when a classification target is not numeric ('cat', 'dog'): the
    stages train on their index in this sorted list, and submit writes the labels back. A label set's
    labels (``label_names``) always: submit writes them back by name."""
    comp = cfg.competition
    if get_task(comp.task).label_sets:  # a label set's outputs, by name
        return label_names(cfg)
    if not get_task(comp.task).classes:
        return None
    path = table_path(cfg, "train")
    col = targets(cfg)[0]
    values = pd.read_csv(path, usecols=[col], dtype={col: str})[col] if path.exists() else None
    if values is None or pd.to_numeric(values.dropna(), errors="coerce").notna().all():
        return None
    return sorted(values.dropna().unique().tolist())


def encode_labels(df: pd.DataFrame, column: str, labels: list, path: Path) -> pd.DataFrame:
    """String class labels -> 0..K-1 (their index in ``labels``)."""
    index = {v: k for k, v in enumerate(labels)}
    codes = df[column].astype(str).map(index)
    unknown = codes.isna() & df[column].notna()
    if unknown.any():
        raise InputError(f"{path}: column '{column}' has label {df[column][unknown].iloc[0]!r} at "
                         f"{_rows(np.flatnonzero(unknown))}, not among the train labels {labels}.")
    return df.assign(**{column: codes.where(df[column].notna())})


def num_classes(cfg: Config, train: pd.DataFrame, column: str | None = None) -> int:
    comp = cfg.competition
    if comp.num_classes is not None:
        return int(comp.num_classes)
    column = column or targets(cfg)[0]
    return int(train[column].max()) + 1


def load_folds(cfg: Config) -> tuple[pd.DataFrame, str]:
    """The folds table of this competition and its content hash (later stages record it)."""
    path = folds_file(cfg)
    if not path.exists():
        raise InputError(f"{path}: folds file not found; run `make folds` (python -m pipeline folds -c <config>) first.")
    id_col = cfg.competition.id
    return pd.read_csv(path, dtype={id_col: str}), file_hash(path)


def fold_of(cfg: Config, train_df: pd.DataFrame, folds_df: pd.DataFrame) -> np.ndarray:
    """The fold of every train row, in train.csv order; refuses a folds file that does not cover it."""
    id_col = cfg.competition.id
    merged = train_df[[id_col]].merge(folds_df, on=id_col, how="left")
    if merged["fold"].isna().any() or len(folds_df) != len(train_df):
        missing = merged.loc[merged["fold"].isna(), id_col].head(3).tolist()
        raise InputError(f"{folds_file(cfg)} does not cover {table_path(cfg, 'train')} (e.g. ids {missing} have no "
                         f"fold, or it has {len(folds_df)} rows for {len(train_df)}); rerun `make folds`.")
    return merged["fold"].astype(int).to_numpy()


# ------------------------------------------------------------------ repeated folds (folds.repeats)
def repeat_columns(folds_df: pd.DataFrame) -> list[str]:
    """The folds file's fold columns, one per repeat: ``fold`` (repeat 0, models 0..K-1), ``fold_1``
    (repeat 1, models K..2K-1), ... A model's number is unique over all repeats."""
    extra = sorted((c for c in folds_df.columns if c.startswith("fold_") and c[5:].isdigit()), key=lambda c: int(c[5:]))
    return ["fold", *extra]


def fold_matrix(cfg: Config, train_df: pd.DataFrame, folds_df: pd.DataFrame) -> np.ndarray:
    """(rows, repeats): the model that holds out each train row in each repeat, in train.csv order. Model m
    validates on the rows where any column equals m and trains on every other row."""
    first = fold_of(cfg, train_df, folds_df)
    cols = repeat_columns(folds_df)
    if len(cols) == 1:
        return first[:, None]
    merged = train_df[[cfg.competition.id]].merge(folds_df, on=cfg.competition.id, how="left")
    k = int(first.max()) + 1
    out = np.stack([first] + [merged[c].astype(int).to_numpy() for c in cols[1:]], axis=1)
    for r, c in enumerate(cols):
        if not ((out[:, r] >= r * k) & (out[:, r] < (r + 1) * k)).all():
            raise InputError(f"{folds_file(cfg)}: column '{c}' must hold models {r * k}..{(r + 1) * k - 1} (repeat "
                             f"{r} of {k} folds); rerun `make folds`.")
    return out


def repeat_of(matrix: np.ndarray, model: int) -> int:
    """The repeat (column of ``fold_matrix``) whose split model ``model`` belongs to."""
    return int((matrix == int(model)).any(axis=0).argmax())


def held_out(matrix: np.ndarray, model) -> np.ndarray:
    """Rows model ``model`` never trained on (its validation rows); none for the all-data model."""
    if str(model) == "full":
        return np.zeros(len(matrix), dtype=bool)
    return (matrix == int(model)).any(axis=1)
