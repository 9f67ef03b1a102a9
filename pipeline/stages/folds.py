"""``make folds``: assign every train row to a validation fold.

Splitters: StratifiedGroupKFold (a group column is set), StratifiedKFold, GroupKFold, KFold.
Continuous targets are binned into quantiles for stratification. Optional balancing moves whole
groups (or single rows when there are no groups) between folds until the fold sizes match, never
splitting a group. Writes ``folds/<name>.csv`` (id, fold; with ``folds.repeats: R`` also fold_1 .. fold_<R-1>,
splits by other seeds whose models are numbered on) plus a report (table, PNG, leakage check).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.competition.tables import (
    check_image_files,
    competition_key,
    label_columns,
    label_names,
    load_test,
    load_train,
    table_path,
    truth,
)
from pipeline.errors import InputError
from pipeline.store import leaderboard, plots
from pipeline.store.artifacts import ArtifactGroup, stage_lock
from pipeline.store.io import config_hash, file_hash, is_up_to_date, log, provenance, resolved_config_text, text_hash
from pipeline.store.paths import folds_file, sidecar, targets
from pipeline.tasks import task_of

if TYPE_CHECKING:
    from pipeline.config.schema import Config


def resolve_method(cfg: Config) -> str:
    method = cfg.folds.method
    if method != "auto":
        return method
    return "stratified_group" if cfg.competition.group else "stratified"


def stratify_labels(cfg: Config, df: pd.DataFrame) -> np.ndarray:
    """Labels used for stratification: the class, the quantile bin of a continuous target, or a label set's
    (rows, labels) 0/1 matrix."""
    if task_of(cfg).stratify == "labels":
        return truth(cfg, df)
    y = df[targets(cfg)[0]]
    if task_of(cfg).stratify == "classes":
        return y.astype(int).to_numpy()
    bins = pd.qcut(y.rank(method="first"), q=min(cfg.folds.bins, len(y)), labels=False, duplicates="drop")
    return np.asarray(bins, dtype=int)


def _check_splittable(cfg: Config, method: str, labels: np.ndarray | None, groups: np.ndarray | None, path) -> None:
    k = cfg.folds.n_splits
    comp = cfg.competition
    if labels is not None and labels.ndim == 2:  # a label set: rare labels cannot be in every fold
        rare = [(c, int(n)) for c, n in zip(label_columns(cfg), labels.sum(0)) if n < k]
        if rare:
            log("[folds] warning: " + ", ".join(f"label '{c}' is present in {n} row(s)" for c, n in rare)
                + f", fewer than folds.n_splits={k}; it cannot appear in every fold")
        labels = None
    if method in ("stratified_group", "group"):
        if groups is None:
            raise InputError(f"folds.method '{method}' needs competition.group (a column of {path}); "
                             "set it or use folds.method=stratified.")
        n_groups = len(np.unique(groups))
        if n_groups < k:
            raise InputError(f"{path}: group column '{comp.group}' has only {n_groups} groups, fewer than "
                             f"folds.n_splits={k}; lower n_splits or choose a finer group.")
    if method in ("stratified", "stratified_group") and labels is not None:
        values, counts = np.unique(labels, return_counts=True)
        what = "class" if task_of(cfg).classes else "target bin"
        small = [(v, c) for v, c in zip(values, counts) if c < k]
        if small:
            desc = ", ".join(f"{v} ({c} rows)" for v, c in small)
            raise InputError(f"{path}: column '{targets(cfg)[0]}' has {what}(es) with fewer members than "
                             f"folds.n_splits={k}: {desc}; lower n_splits, merge rare classes, or use folds.method=kfold.")
        if method == "stratified_group":
            n_groups_per = {v: len(np.unique(groups[labels == v])) for v in values}
            small = [(v, g) for v, g in n_groups_per.items() if g < k]
            if small:
                log("[folds] warning: " + ", ".join(f"{what} {v} occurs in only {g} group(s)" for v, g in small)
                    + f"; it cannot appear in all {k} folds")


def split(method: str, n_splits: int, seed: int, labels: np.ndarray | None, groups: np.ndarray | None) -> np.ndarray:
    from sklearn.model_selection import (
        GroupKFold,
        KFold,
        StratifiedGroupKFold,
        StratifiedKFold,
    )

    n = len(labels) if labels is not None else len(groups)
    X = np.zeros(n)
    if labels is not None and labels.ndim == 2 and method in ("stratified", "stratified_group"):
        return label_set_split(labels, groups if method == "stratified_group" else None, n_splits, seed)
    if method == "stratified_group":
        splitter, args = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed), (X, labels, groups)
    elif method == "stratified":
        splitter, args = StratifiedKFold(n_splits, shuffle=True, random_state=seed), (X, labels)
    elif method == "group":
        # GroupKFold is deterministic; shuffle the group ids by seed so seeds give different splits
        uniq = np.unique(groups)
        perm = dict(zip(uniq, np.random.default_rng(seed).permutation(len(uniq))))
        splitter, args = GroupKFold(n_splits), (X, None, np.array([perm[g] for g in groups]))
    else:
        splitter, args = KFold(n_splits, shuffle=True, random_state=seed), (X,)
    fold = np.full(n, -1, dtype=int)
    for k, (_, valid) in enumerate(splitter.split(*args)):
        fold[valid] = k
    return fold


def label_set_split(Y: np.ndarray, groups: np.ndarray | None, n_splits: int, seed: int) -> np.ndarray:
    """Iterative stratification of a label set over whole groups (each row its own group without groups).
    As in Sechidis, Tsoumakas & Vlahavas (2011) the rarest labels are placed first: groups are taken in the
    order of the rarest label they hold (larger groups first, then at random by seed). Each joins the fold it
    fills best: the one where the squared shortfall of every label's quota (relative to the quota, so a rare
    label counts as much as a common one) and of the row quota falls most."""
    rng = np.random.default_rng(seed)
    units = groups if groups is not None else np.arange(len(Y))
    uniq, unit_of = np.unique(units, return_inverse=True)
    counts = np.zeros((len(uniq), Y.shape[1]))
    np.add.at(counts, unit_of, Y)
    size = np.bincount(unit_of).astype(float)
    quota, row_quota = np.maximum(counts.sum(0) / n_splits, 1e-9), len(Y) / n_splits
    short, short_rows = np.tile(quota, (n_splits, 1)), np.full(n_splits, row_quota)
    groups_with = (counts > 0).sum(0)
    rarest = np.where(counts > 0, groups_with[None, :], np.inf).min(axis=1)
    unit_fold = np.empty(len(uniq), dtype=int)
    for u in np.lexsort((rng.random(len(uniq)), -size, rarest)):
        change = ((counts[u] ** 2 - 2 * counts[u] * short) / quota ** 2).sum(axis=1) \
            + (size[u] ** 2 - 2 * size[u] * short_rows) / row_quota ** 2
        f = int(np.argmin(change + rng.random(n_splits) * 1e-9))  # (a random tie-break)
        unit_fold[u] = f
        short[f] -= counts[u]
        short_rows[f] -= size[u]
    return unit_fold[unit_of]


def balance(fold: np.ndarray, groups: np.ndarray | None, labels: np.ndarray | None, n_splits: int,
            max_moves: int = 100_000) -> np.ndarray:
    """Move whole groups (or single rows) from the largest to the smallest fold while that narrows
    the gap. A group is never split. Without groups, the moved row is of the class most
    over-represented in the large fold relative to the small one, to keep stratification."""
    fold = fold.copy()
    units = groups if groups is not None else np.arange(len(fold))
    uniq, unit_idx = np.unique(units, return_inverse=True)
    unit_size = np.bincount(unit_idx)
    unit_fold = np.zeros(len(uniq), dtype=int)
    unit_fold[unit_idx] = fold
    for _ in range(max_moves):
        sizes = np.bincount(unit_fold, weights=unit_size, minlength=n_splits)
        big, small = int(sizes.argmax()), int(sizes.argmin())
        gap = sizes[big] - sizes[small]
        candidates = np.flatnonzero((unit_fold == big) & (unit_size < gap))
        if gap <= 1 or len(candidates) == 0:
            break
        if groups is None and labels is not None:
            share_big = np.bincount(labels[fold == big], minlength=labels.max() + 1) / max(sizes[big], 1)
            share_small = np.bincount(labels[fold == small], minlength=labels.max() + 1) / max(sizes[small], 1)
            excess = (share_big - share_small)[labels[candidates]]
            pick = candidates[int(np.argmax(excess))]
        else:
            pick = candidates[int(np.argmin(np.abs(unit_size[candidates] - gap / 2)))]
        unit_fold[pick] = small
        fold[unit_idx == pick] = small
    return fold


def stratification_error(fold: np.ndarray, labels: np.ndarray | None) -> float:
    """Largest gap, in percentage points, between a class's (or a label's) share in a fold and overall."""
    if labels is None:
        return 0.0
    if labels.ndim == 2:
        overall = labels.mean(0)
        return 100 * max(float(np.abs(labels[fold == k].mean(0) - overall).max()) for k in np.unique(fold))
    n_cls = labels.max() + 1
    overall = np.bincount(labels, minlength=n_cls) / len(labels)
    worst = 0.0
    for k in np.unique(fold):
        share = np.bincount(labels[fold == k], minlength=n_cls) / max((fold == k).sum(), 1)
        worst = max(worst, float(np.abs(share - overall).max()))
    return 100 * worst


def make_folds(cfg: Config, df: pd.DataFrame, path="train.csv") -> np.ndarray:
    """Fold index per row of ``df`` (validated train table), per the ``folds`` config."""
    fc = cfg.folds
    method = resolve_method(cfg)
    group_col = cfg.competition.group
    groups = df[group_col].astype(str).to_numpy() if group_col else None
    labels = stratify_labels(cfg, df)
    strat = labels if method in ("stratified", "stratified_group") else None
    _check_splittable(cfg, method, strat, groups if method in ("stratified_group", "group") else None, path)
    use_groups = groups if method in ("stratified_group", "group") else None
    best, best_err = None, None
    for trial in range(max(1, int(fc.search))):
        fold = split(method, fc.n_splits, fc.seed + trial, strat, use_groups)
        if fc.balance:
            fold = balance(fold, use_groups, strat if strat is None or strat.ndim == 1 else None, fc.n_splits)
        err = stratification_error(fold, strat)
        if best is None or err < best_err:
            best, best_err = fold, err
    return best


def report(cfg: Config, df: pd.DataFrame, fold: np.ndarray) -> tuple[pd.DataFrame, dict]:
    """Per-fold table (rows, groups, target distribution) and summary checks."""
    comp = cfg.competition
    target = targets(cfg)[0]
    table = pd.DataFrame({"fold": range(cfg.folds.n_splits)}).set_index("fold")
    table["rows"] = pd.Series(fold).value_counts().sort_index()
    method = resolve_method(cfg)
    if task_of(cfg).label_sets and method in ("stratified", "stratified_group"):
        method += " (iterative, over every label)"
    summary = {"method": method, "n_splits": cfg.folds.n_splits, "rows": int(len(df))}
    if comp.group:
        g = df[comp.group].astype(str).to_numpy()
        table["groups"] = pd.Series(g).groupby(fold).nunique()
        per_group = pd.Series(fold).groupby(g).nunique()
        summary["groups"] = int(len(per_group))
        summary["groups_in_several_folds"] = int((per_group > 1).sum())
    if task_of(cfg).stratify == "labels":
        Y = pd.DataFrame(truth(cfg, df), columns=label_names(cfg))
        shares = Y.groupby(fold).mean() * 100
        for c in shares.columns:
            table[f"{c} %"] = shares[c].round(2)
        summary["max_share_deviation_pp"] = round(float((shares - Y.mean() * 100).abs().to_numpy().max()), 3)
        summary["shares_of"] = "label"
        summary["overall_share_pct"] = {str(k): round(float(v) * 100, 2) for k, v in Y.mean().items()}
    elif task_of(cfg).classes:
        y = df[target].astype(int).to_numpy()
        shares = pd.crosstab(fold, y, normalize="index") * 100
        overall = pd.Series(y).value_counts(normalize=True).sort_index() * 100
        for c in shares.columns:
            table[f"{target}={c} %"] = shares[c].round(2)
        summary["max_share_deviation_pp"] = round(float((shares - overall).abs().to_numpy().max()), 3)
        summary["overall_share_pct"] = {str(k): round(float(v), 2) for k, v in overall.items()}
    else:
        y = df[target].astype(float)
        grouped = y.groupby(fold)
        table[f"{target} mean"] = grouped.mean().round(4)
        table[f"{target} std"] = grouped.std().round(4)
        summary["max_mean_deviation"] = round(float((grouped.mean() - y.mean()).abs().max()), 4)
    summary["size_range"] = [int(table["rows"].min()), int(table["rows"].max())]
    return table, summary


def report_text(table: pd.DataFrame, summary: dict) -> str:
    lines = [table.to_string(), ""]
    lines.append(f"method={summary['method']} n_splits={summary['n_splits']} rows={summary['rows']} "
                 f"fold sizes {summary['size_range'][0]}..{summary['size_range'][1]}")
    if "groups" in summary:
        leak = summary["groups_in_several_folds"]
        lines.append(f"leakage check: {summary['groups']} groups, {leak} in more than one fold "
                     + ("(OK)" if leak == 0 else "(LEAK!)"))
    if "max_share_deviation_pp" in summary:
        lines.append(f"stratification: largest {summary.get('shares_of', 'class')}-share deviation from overall = "
                     f"{summary['max_share_deviation_pp']:.3f} pp")
    if "max_mean_deviation" in summary:
        lines.append(f"stratification: largest fold-mean deviation from overall = {summary['max_mean_deviation']}")
    return "\n".join(lines) + "\n"


def run(cfg: Config, force: bool = False) -> Path:
    """Stage entry point: validate train.csv, test.csv and every image, split, write the folds CSV and
    its report as one group (under a lock, so concurrent runs never mix their files); skip when up to date."""
    out = folds_file(cfg)
    meta_path = sidecar(out, ".meta.json")
    train_file = table_path(cfg, "train")
    fcfg = {k: v for k, v in dict(cfg.folds).items() if not (k == "repeats" and v == 1)}  # (older keys stand)
    key_inputs = {"competition": competition_key(cfg.competition), "folds": fcfg}
    with stage_lock(out):
        key = config_hash([key_inputs, file_hash(train_file) if train_file.exists() else None])
        if not force and is_up_to_date(meta_path, key, [out]):
            log(f"[folds] up to date: {out} (change the config or train.csv, or pass --force, to rerun)")
            return out
        started = time.time()
        df = load_train(cfg, check_images=False)
        test = load_test(cfg, check_images=False)
        repeats = [make_folds(cfg, df, train_file)]
        for r in range(1, cfg.folds.repeats):  # another seed per repeat; its models numbered after
            again = cfg.updated({"folds.seed": cfg.folds.seed + 7919 * r})
            repeats.append(make_folds(again, df, train_file) + r * cfg.folds.n_splits)
        fold = repeats[0]
        mode = cfg.competition.check_images
        if mode:  # every train and test image, before any training
            id_col = cfg.competition.id
            check_image_files(cfg, df[id_col], train_file, mode)
            check_image_files(cfg, test[id_col], table_path(cfg, "test"), mode, "test")
        table, summary = report(cfg, df, fold)
        for r, again in enumerate(repeats[1:], 1):  # every repeat keeps groups whole
            _, rs = report(cfg, df, again - r * cfg.folds.n_splits)
            summary["groups_in_several_folds"] = summary.get("groups_in_several_folds", 0) + rs.get(
                "groups_in_several_folds", 0)
        if summary.get("groups_in_several_folds", 0):
            raise RuntimeError(f"internal error: {summary['groups_in_several_folds']} groups span several folds")
        text = report_text(table, summary)
        if len(repeats) > 1:
            summary["repeats"] = len(repeats)
            text += (f"repeats: {len(repeats)} splits with different seeds, columns fold, "
                     + ", ".join(f"fold_{r}" for r in range(1, len(repeats)))
                     + f" (models 0..{len(repeats) * cfg.folds.n_splits - 1}); the table is repeat 0's\n")
        id_col = cfg.competition.id
        folds_csv = pd.DataFrame({id_col: df[id_col], "fold": fold, **{f"fold_{r}": f for r, f in
                                                                       enumerate(repeats[1:], 1)}}).to_csv(index=False)
        fig = plots.fold_report(df, fold, targets(cfg)[0], task_of(cfg).classes,
                                label_columns(cfg) if task_of(cfg).label_sets else None)
        with ArtifactGroup(meta_path) as group:
            group.text(out, folds_csv)
            group.figure(sidecar(out, ".report.png"), fig)
            group.text(sidecar(out, ".report.txt"), text)
            group.text(sidecar(out, ".config.yaml"), resolved_config_text(cfg))
            group.commit(provenance(cfg, "folds", key, folds_hash=text_hash(folds_csv),
                                    train_hash=file_hash(train_file), report=summary,
                                    stage_config_hash=config_hash(key_inputs)))
    leaderboard.record(cfg, "folds", started, artifacts=[str(out)], experiment=cfg.competition.name + ":folds")
    log(text.rstrip())
    log(f"[folds] wrote {out} ({len(df)} rows) and its report {sidecar(out, '.report.png')}")
    return out
