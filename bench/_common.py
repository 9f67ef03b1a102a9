"""Helpers shared by the benchmarks (not part of the product)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-writers"
OUT = Path(__file__).resolve().parent / "out"


def synthetic_competition(root: Path, n: int = 2048, size: int = 32, n_classes: int = 10, seed: int = 0) -> Path:
    """PNG images (RGB) whose content depends on the label, plus the usual CSVs."""
    from PIL import Image

    if (root / "train.csv").exists():
        return root
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    y = rng.integers(0, n_classes, n)
    ids = [f"s{i:05d}" for i in range(n)]
    for i, label in zip(ids, y):
        arr = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
        arr[int(label) * size // n_classes:(int(label) + 1) * size // n_classes] = 240
        Image.fromarray(arr).save(root / "images" / f"{i}.png")
    pd.DataFrame({"id": ids, "target": y, "grp": rng.integers(0, 64, n)}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": ids[:64]}).to_csv(root / "test.csv", index=False)
    pd.DataFrame({"id": ids[:64], "target": 0}).to_csv(root / "sample_submission.csv", index=False)
    return root


def mnist_subset(n_rows: int = 10_000, seed: int = 0, labelled: int | None = None) -> Path:
    """A writer-grouped subset of mnist-writers (whole writers, about n_rows train rows) with the full test
    set; images stay where they are (absolute image pattern)."""
    if not SHARED.exists():
        raise SystemExit(f"mnist-writers not found at {SHARED}")
    root = OUT / f"mnist{n_rows}"
    if (root / "train.csv").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    train = pd.read_csv(SHARED / "train.csv", dtype={"id": str})
    writers = train["writer"].drop_duplicates().sample(frac=1.0, random_state=seed)
    counts = train.groupby("writer").size().loc[writers].cumsum()
    keep = counts[counts <= n_rows].index
    train[train["writer"].isin(keep)].to_csv(root / "train.csv", index=False)
    for f in ("test.csv", "sample_submission.csv", "solution.csv"):
        shutil.copy(SHARED / f, root / f)
    return root


def mnist_overrides(root: Path) -> list[str]:
    return [f"competition.root={root}", f"competition.image={SHARED}/images/{{id}}.png", "competition.check_images=false",
            f"folds.file={OUT}/folds/{{competition}}-{root.name}.csv", f"leaderboard.path={OUT}/leaderboard.db"]


def bench_trainer(root: Path, *overrides: str):
    """The throughput benchmarks' set-up: a FoldTrainer over every row of a synthetic competition (images
    cached, constant lr, no leaderboard), with its config and heads."""
    from pipeline.competition.tables import load_train
    from pipeline.config.loading import load_config
    from pipeline.training.models import heads_for
    from pipeline.training.trainer import FoldTrainer

    cfg = load_config(None, [f"competition.root={root}", "competition.check_images=false", "data.in_chans=3",
                             "data.cache=true", "train.scheduler=none", "train.epochs=100",
                             "leaderboard.enabled=false", *overrides])
    df = load_train(cfg)
    heads = heads_for(cfg, df)
    idx = np.arange(len(df))
    return cfg, heads, FoldTrainer(cfg, heads, df, idx, idx[:64], 0, OUT / "throughput_run", "bench", "none")
