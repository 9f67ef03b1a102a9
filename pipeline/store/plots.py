"""Every figure the pipeline draws (PNG, written atomically). ``matplotlib.use("Agg")`` happens here
once, so plotting works with no display (CI, Kaggle, a server)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.store.io import atomic_path  # noqa: E402


def save_figure(path: str | Path, fig) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def fold_report(df: pd.DataFrame, fold: np.ndarray, target: str, classification: bool, labels: list | None = None):
    """Rows per fold, and the target's share (classes), each label's share (``labels``: a label set's 0/1
    columns) or spread (continuous) per fold."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    sizes = pd.Series(fold).value_counts().sort_index()
    axes[0].bar(sizes.index.astype(str), sizes.to_numpy(), color="tab:blue")
    axes[0].set(title="rows per fold", xlabel="fold", ylabel="rows")
    if labels:
        shares = df[labels].groupby(fold).mean() * 100
        for c in labels:
            axes[1].plot(shares.index.astype(str), shares[c], marker="o", label=str(c))
        axes[1].set(title="each label's share per fold (%)", xlabel="fold", ylabel="% of rows")
        axes[1].legend(fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    elif classification:
        shares = pd.crosstab(fold, df[target].astype(int), normalize="index") * 100
        bottom = np.zeros(len(shares))
        for c in shares.columns:
            axes[1].bar(shares.index.astype(str), shares[c], bottom=bottom, label=str(c))
            bottom += shares[c].to_numpy()
        axes[1].set(title=f"'{target}' share per fold (%)", xlabel="fold", ylabel="%")
        axes[1].legend(title=target, fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    else:
        data = [df[target].to_numpy()[fold == k] for k in sorted(np.unique(fold))]
        axes[1].boxplot(data)
        axes[1].set_xticks(range(1, len(data) + 1), [str(k) for k in sorted(np.unique(fold))])
        axes[1].set(title=f"'{target}' per fold", xlabel="fold")
    fig.tight_layout()
    return fig


def curves(logs: pd.DataFrame, metric_name: str, title: str):
    """Training curves (train loss, valid loss, score): mean ± std over folds per epoch."""
    cols = [c for c in ("train_loss", "valid_loss", "score") if c in logs.columns]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.4))
    axes = np.atleast_1d(axes)
    for ax, col in zip(axes, cols):
        # epochs that were not scored (train.valid_from) have no valid loss or score: leave them out
        stats = logs.groupby("epoch")[col].agg(["mean", "std"]).dropna(subset=["mean"]).fillna(0)
        ax.plot(stats.index, stats["mean"], marker="o")
        ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.25)
        ax.set(title=metric_name if col == "score" else col, xlabel="epoch")
    fig.suptitle(f"{title}: mean ± std over folds")
    fig.tight_layout()
    return fig


def lr_finder(lrs, losses, smooth, suggestion: float, top: float, title: str):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses, alpha=0.3, label="loss")
    ax.plot(lrs, smooth, label="smoothed")
    ax.axvline(suggestion, color="r", ls="--", label=f"suggested {suggestion:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss", title=title)
    ax.set_ylim(top=top)
    ax.legend()
    return fig


def importance(imp: pd.Series, title: str, top: int = 30):
    imp = imp.sort_values(ascending=True).tail(top)
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(imp) + 1.2))
    ax.barh(imp.index, imp.to_numpy(), color="tab:green")
    ax.set(title=f"{title}: LightGBM gain importance (mean over folds)", xlabel="gain")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def cv_vs_lb(df: pd.DataFrame):
    """CV vs public and CV vs private LB per experiment (correlation, y = x)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.3))
    for ax, col in zip(axes, ("public", "private")):
        d = df.dropna(subset=["cv", col])
        ax.scatter(d["cv"], d[col])
        for r in d.itertuples():
            ax.annotate(r.experiment, (r.cv, getattr(r, col)), fontsize=7)
        if len(d):
            lo = min(d["cv"].min(), d[col].min())
            hi = max(d["cv"].max(), d[col].max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
            ax.legend(loc="lower right")
        corr = d["cv"].corr(d[col]) if len(d) > 1 else float("nan")
        ax.set(title=f"CV vs {col} LB (r = {corr:.3f}, n = {len(d)})", xlabel="CV", ylabel=f"{col} LB")
    fig.tight_layout()
    return fig


SCORES = (("cv", "CV, one model", "o"), ("predicted", "predicted submission", "^"), ("public", "public LB", "s"),
          ("private", "private LB", "D"))


def scores_by_experiment(df: pd.DataFrame):
    """Per experiment (one panel per metric): CV, the predicted fold-mean submission score and the public and
    private LB, so one sees which of CV and prediction the leaderboard follows (mean gap to the LB in the legend)."""
    groups = list(df.groupby("metric", sort=False))
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(6.0, 0.9 * df["experiment"].nunique() + 3), 3.6 * len(groups)),
                             squeeze=False)
    for ax, (metric, g) in zip(axes[:, 0], groups):
        g = g.reset_index(drop=True)
        x = np.arange(len(g))
        lb = g["private"].where(g["private"].notna(), g["public"]) if "private" in g else None
        for col, label, marker in SCORES:
            vals = pd.to_numeric(g[col], errors="coerce") if col in g else pd.Series(np.nan, index=g.index)
            if vals.notna().any():
                gap = (vals - lb).abs().mean() if col in ("cv", "predicted") and lb is not None else np.nan
                ax.plot(x, vals, marker=marker, ls="none", ms=7,
                        label=label + (f" (mean |gap| to LB {gap:.4f})" if np.isfinite(gap) else ""))
        ax.set_xticks(x, g["experiment"], rotation=30, ha="right", fontsize=8)
        ax.set(ylabel=metric, title=f"{metric}: CV, predicted submission and LB per experiment")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def optuna_figures(study, metric_name: str, out_dir: str | Path) -> list[Path]:
    """Optuna's own optimisation-history and parameter-importance plots (its matplotlib backend) as
    ``history.png`` and ``importance.png``; importance is left out while it cannot be computed (under two
    completed trials). Optuna switches to the ggplot style: it is undone for the pipeline's own figures."""
    import warnings

    from optuna.visualization import matplotlib as ov

    written = []
    with plt.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        for stem, draw in (("history", ov.plot_optimization_history), ("importance", ov.plot_param_importances)):
            try:
                fig = draw(study, target_name=metric_name).figure
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                print(f"[tune] no {stem} plot yet: {exc}", flush=True)
                continue
            fig.set_size_inches(7, 4.2)
            save_figure(Path(out_dir) / f"{stem}.png", fig)
            written.append(Path(out_dir) / f"{stem}.png")
    return written
