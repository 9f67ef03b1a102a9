"""Two level-1 experiments on a writer-grouped mnist-writers subset, LightGBM level 2 on their TTA
statistics plus the `series` column, and locally scored submissions (public/private).

Prints: each level-1 experiment's CV (per fold, mean ± std, with and without TTA), level-2 CV, and
the public/private scores of every submission. Runs in bench/out/work (git-ignored).

    python bench/mnist_stack.py [--rows 10000] [--epochs 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import OUT, mnist_overrides, mnist_subset  # noqa: E402
from pipeline.config.loading import load_config  # noqa: E402
from pipeline.stages import (
    features,
    folds,
    stack,
    submit,
    train,  # noqa: E402
)
from pipeline.store.io import read_json  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist-writers.yaml"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    root = mnist_subset(args.rows)
    work = OUT / "work"
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    common = mnist_overrides(root) + [f"train.epochs={args.epochs}", "train.batch_size=128", "train.lr=0.001",
                                      "train.warmup_epochs=1", "features.scales=[0.875,1.0,1.125]",
                                      "features.keep_views=true"]
    exps = {
        "mnist-resnet18-32": ["model.backbone=resnet18", "data.image_size=32"],
        "mnist-resnet10t-28-gem": ["model.backbone=resnet10t", "data.image_size=28", "model.pool=gem"],
    }
    t0 = time.time()
    results = {}
    for name, extra in exps.items():
        cfg = load_config(CONFIG, common + extra + [f"name={name}"])
        folds.run(cfg)
        summary = train.run(cfg)
        features.run(cfg)
        submit.run(cfg)
        results[name] = (summary, read_json(Path("features") / name / "cv.json"),
                         read_json(Path("submissions") / f"{name}.json"))
    scfg = load_config(CONFIG, common + ["name=mnist-stack", f"stack.experiments={list(exps)}"])
    stack.run(scfg)
    submit.run(scfg)
    s_cv = read_json(Path("features") / "mnist-stack" / "cv.json")
    s_sub = read_json(Path("submissions") / "mnist-stack.json")
    print(f"\n=== mnist-writers subset: {root}, {args.epochs} epochs, {time.time() - t0:.0f}s ===")
    print(f"{'experiment':26s} {'train CV mean±std':>20s} {'OOF noTTA':>10s} {'OOF TTA':>9s} {'public':>8s} {'private':>8s}")
    for name, (summary, cv, sub) in results.items():
        print(f"{name:26s} {summary['cv_mean']:.4f} ± {summary['cv_std']:.4f}     {cv['overall']['no_tta']:.4f}"
              f"    {cv['overall']['tta']:.4f}   {sub['local']['public']:.4f}   {sub['local']['private']:.4f}")
    per_fold = [v["tta"] for k, v in s_cv.items() if k.startswith("fold")]
    import numpy as np

    print(f"{'mnist-stack (LightGBM L2)':26s} {np.mean(per_fold):.4f} ± {np.std(per_fold):.4f}     "
          f"{s_cv['overall']['tta']:.4f}    {'':7s}   {s_sub['local']['public']:.4f}   {s_sub['local']['private']:.4f}")


if __name__ == "__main__":
    main()
