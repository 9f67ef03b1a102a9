"""Where every artifact lives, and how feature-set columns are named.

All outputs go under one workspace root, ``workdir`` (default: the current directory; e.g.
``workdir=/kaggle/working`` or a team share), never under ``competition.root``:

    <workdir>/folds/<competition>.csv           folds + report, config, meta
    <workdir>/models/<exp>/fold<k>/             checkpoints, log, meta        (train)
    <workdir>/models/pretrain/<name>-<bb>.pt    jigsaw backbone               (pretrain)
    <workdir>/features/<set>/                   oof.parquet, test.parquet     (features, stack, postprocess)
    <workdir>/submissions/<set>.csv             submission + leaderboard.db   (submit)
    <workdir>/tune/<study>/                     study.db, trial configs, plots (tune)

A feature set's prediction columns are ``<set>__<head>__<output>__<stat>``: ``feature_column`` writes
that scheme and ``parse_column`` / ``head_prediction`` read it; no other module spells it out.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from pipeline.errors import InputError
from pipeline.tasks import get_task

SEP = "__"


def workdir(cfg: dict) -> Path:
    return Path(cfg.get("workdir") or ".")


def under(cfg: dict, path: str | Path) -> Path:
    """A configured path resolved against the workspace (absolute paths are kept)."""
    path = Path(path)
    return path if path.is_absolute() else workdir(cfg) / path


def folds_file(cfg: dict) -> Path:
    return under(cfg, cfg.folds.file.format(competition=cfg.competition.name, name=cfg.name))


def sidecar(path: Path, suffix: str) -> Path:
    """``folds/demo.csv`` -> ``folds/demo<suffix>`` (report, config, meta beside the folds file)."""
    return path.with_name(path.stem + suffix)


def models_dir(cfg: dict, experiment: str | None = None) -> Path:
    return workdir(cfg) / "models" / (experiment or cfg.name)


def fold_dir(cfg: dict, fold, experiment: str | None = None) -> Path:
    return models_dir(cfg, experiment) / f"fold{fold}"


def pretrain_file(cfg: dict) -> Path:
    return under(cfg, cfg.pretrain.output.format(backbone=cfg.model.backbone, name=cfg.name))


def features_dir(cfg: dict, name: str | None = None) -> Path:
    return workdir(cfg) / "features" / (name or cfg.name)


def submissions_dir(cfg: dict) -> Path:
    return workdir(cfg) / "submissions"


def leaderboard_db(cfg: dict | None) -> Path | str:
    """The leaderboard's SQLite file under workdir, or ``leaderboard.url`` (a server database) when set."""
    lcfg = (cfg or {}).get("leaderboard") or {}
    if lcfg.get("url"):
        return lcfg["url"]
    path = lcfg.get("path") or "submissions/leaderboard.db"
    return under(cfg, path) if cfg else Path(path)


def tune_dir(cfg: dict, study: str) -> Path:
    """``<workdir>/tune/<study>/``: the default SQLite study, trial configs, history and importance plots."""
    return workdir(cfg) / "tune" / study


# ------------------------------------------------------------------------ feature-set column scheme
def targets(cfg: dict) -> list[str]:
    t = cfg.competition.target
    return [t] if isinstance(t, str) else list(t)


def main_head(cfg: dict) -> str:
    """The name of the head that predicts the competition's target, as its prediction columns say it: the
    target column; for a label set given as several 0/1 columns, ``labels`` (one head over all of them)."""
    t = cfg.competition.target
    if get_task(cfg.competition.task).label_sets and not isinstance(t, str):
        return "labels"
    return targets(cfg)[0]


def stack_inputs(cfg: dict) -> list[str]:
    return list(cfg.stack.experiments or [cfg.name])


def stack_name(cfg: dict) -> str:
    """Name of the level-2 feature set a config's stack stage writes (features/<name>/)."""
    if cfg.stack.name:
        return cfg.stack.name
    return cfg.name + "-l2" if cfg.name in stack_inputs(cfg) else cfg.name


def submission_source(cfg: dict) -> str:
    """The feature set a config submits (``submit``) and bundles (``kaggle``): ``submit.source``, else the
    furthest stage of its chain that has test predictions: post-processed, level 2, level 1."""
    if cfg.submit.source:
        return cfg.submit.source
    pp = cfg.postprocess.name
    chain = ([pp] if pp else [f"{stack_name(cfg)}-pp", f"{cfg.name}-pp"]) + [stack_name(cfg), cfg.name]
    return next((c for c in chain if (features_dir(cfg, c) / "test.parquet").exists()), cfg.name)


class Column(NamedTuple):
    feature_set: str
    head: str
    output: str  # the output index (class j), or the embedding component
    stat: str  # mean | var | max | min | v<i> (one view) | view0 (identity, internal) | value (embedding)


def feature_column(feature_set: str, head: str, output, stat: str) -> str:
    return SEP.join([feature_set, head, str(output), stat])


def parse_column(name: str) -> Column | None:
    """The parts of a prediction column, or None for other columns (id, fold, tabular)."""
    parts = name.split(SEP)
    return Column(*parts) if len(parts) == 4 else None


def head_prediction(df, feature_set: str, head: str, stat: str = "mean"):
    """The (N,) or (N, C) prediction of one head of a feature set, from its columns."""
    cols = [(int(c.output), name) for name in df.columns
            if (c := parse_column(name)) and c.feature_set == feature_set and c.head == head and c.stat == stat]
    if not cols:
        raise InputError(f"no '{stat}' columns for head '{head}' of feature set '{feature_set}' in the features.")
    arr = df[[name for _, name in sorted(cols)]].to_numpy()
    return arr[:, 0] if arr.shape[1] == 1 else arr


def valid_column(head: str, output) -> str:
    """A column of a fold's ``best_valid.parquet`` (its validation rows' predictions): ``<head>__<j>``."""
    return f"{head}{SEP}{output}"


def valid_prediction(df, head: str):
    """(N,) or (N, C) prediction of one head from a ``best_valid.parquet`` frame."""
    cols = sorted((int(c.split(SEP)[1]), c) for c in df.columns if c.startswith(head + SEP))
    arr = df[[c for _, c in cols]].to_numpy()
    return arr[:, 0] if arr.shape[1] == 1 else arr


def prediction_frame(ids, id_col: str, feature_set: str, head: str, pred, fold=None):
    """Predictions (N,) or (N, C) as a feature-set frame keyed by id (``stat`` = mean)."""
    import numpy as np
    import pandas as pd

    pred = np.asarray(pred).reshape(len(pred), -1)
    df = pd.DataFrame({id_col: ids})
    if fold is not None:
        df["fold"] = fold
    for j in range(pred.shape[1]):
        df[feature_column(feature_set, head, j, "mean")] = pred[:, j]
    return df
