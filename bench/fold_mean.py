"""CV, the predicted fold-mean submission score and the local public/private LB, side by side.

    python bench/fold_mean.py mnist [--rows 10000] [--repeats 2]   # configs/mnist-writers-tiny.yaml (recipe b)
    python bench/fold_mean.py demo [--repeats 2]                   # configs/demo.yaml on the bundled demo

For a level-1 experiment trained with ``folds.repeats`` (R x 5 fold models) and a level-2 stack on it, the
table prints: CV (one model's, the mean of the repeats' CVs), the repeat-to-repeat spread, the score of each
row's mean over its R held-out models (an honest OOF of an R-model ensemble), the predicted score of the
submission and how it was found, and the local public/private scores from solution.csv. A second check of
the estimate from the same models: repeat 0's five models alone (a 5-model fold mean), predicted by the same
rule with M = 5, against their actual private score; and for both, the lift over one model predicted against
the lift on the private rows (the fold models' own mean private score as the base). Runs in bench/out/fold_mean (git-ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import OUT, mnist_overrides, mnist_subset  # noqa: E402


def local_scores(root: Path, ids, pred) -> dict:
    sol = pd.read_csv(root / "solution.csv", dtype={"id": str}).set_index("id").loc[list(ids)]
    hit = sol["target"].to_numpy() == np.asarray(pred)
    pub = (sol["Usage"] == "Public").to_numpy()
    return {"public": float(hit[pub].mean()), "private": float(hit[~pub].mean())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", choices=["mnist", "demo"])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from pipeline.config.loading import load_config
    from pipeline.stages import run_stage

    work = OUT / "fold_mean" / args.data
    work.mkdir(parents=True, exist_ok=True)
    if args.data == "mnist":
        root = mnist_subset(args.rows)
        config, over = ROOT / "configs" / "mnist-writers-tiny.yaml", mnist_overrides(root)
        over = [o.replace(f"{OUT}/folds/", f"{work}/folds/") for o in over]
    else:
        root = ROOT / "data" / "demo"
        if not (root / "train.csv").exists():
            raise SystemExit("run `make data` first (the demo competition)")
        config, over = ROOT / "configs" / "demo.yaml", [f"competition.root={root}"]
    os.chdir(work)
    name = f"{args.data}-r{args.repeats}"
    over = [*over, f"workdir={work}", f"folds.repeats={args.repeats}", f"name={name}",
            f"leaderboard.path={work}/leaderboard.db"]
    started = time.time()
    cfg = load_config(config, over)
    for stage in ("folds", "train", "features", "submit"):
        run_stage(stage, cfg)
    level2 = load_config(config, [*over, f"stack.experiments=[{name}]", "stack.model=lgbm"])
    run_stage("stack", level2)
    stack = f"{name}-l2"
    run_stage("submit", load_config(config, [*over, f"submit.source={stack}"]))
    wall = time.time() - started

    feats = work / "features" / name
    per = pd.read_parquet(feats / "test_folds.parquet")
    cols = [c for c in per.columns if c.endswith("__mean")]
    k = cfg.folds.n_splits
    models = [g for f, g in per.groupby("fold", sort=False) if f != "full"]

    def one_model(gs):  # each fold model alone on the private rows, averaged
        return float(np.mean([local_scores(root, g["id"], g[cols].to_numpy().argmax(1))["private"] for g in gs]))

    rows = []
    for exp in (name, stack):
        cv = json.loads((work / "features" / exp / "cv.json").read_text())
        sub = json.loads((work / "submissions" / f"{exp}.json").read_text())["local"]
        est = cv["submission"]
        rows.append({"experiment": exp, "CV (one model)": cv["overall"]["tta"],
                     "repeats std": (cv.get("repeats") or {}).get("std"),
                     f"OOF mean of {args.repeats}": est.get("repeat_ensemble"),
                     "predicted": est["predicted"], "public": sub["public"], "private": sub["private"],
                     "1-model private": one_model(models) if exp == name else None, "how": est["how"]})
    # the same rule checked on repeat 0's 5 models alone (a plain 5-fold submission)
    first = [g for g in models if int(g["fold"].iloc[0]) < k]
    five = local_scores(root, first[0]["id"], np.mean([g[cols].to_numpy() for g in first], axis=0).argmax(1))
    est = json.loads((feats / "cv.json").read_text())["submission"]
    s1, sr, r = est["single_score"], est["repeat_ensemble"], est["repeats"]
    rows.append({"experiment": f"{name}, repeat 0's {k} models", "CV (one model)": s1,
                 "predicted": s1 + (sr - s1) * (1 - 1 / k) / (1 - 1 / r), **five, "1-model private": one_model(first),
                 "how": f"the same rule with M = {k}"})
    table = pd.DataFrame(rows)
    print(f"\n=== {args.data}: {root}, folds.repeats={args.repeats}, {wall:.0f}s ===")
    with pd.option_context("display.width", 250, "display.max_colwidth", 120, "display.float_format", "{:.4f}".format):
        print(table.to_string(index=False))
    for r in rows:
        line = (f"{r['experiment']}: |CV - private| {abs(r['CV (one model)'] - r['private']):.4f}, "
                f"|predicted - private| {abs(r['predicted'] - r['private']):.4f}")
        if r["1-model private"] is not None:  # the averaging's lift, predicted vs on the private rows
            line += (f"; lift from one model: predicted {r['predicted'] - r['CV (one model)']:+.4f}, private "
                     f"{r['private'] - r['1-model private']:+.4f} (one model: CV {r['CV (one model)']:.4f}, private "
                     f"{r['1-model private']:.4f})")
        print(line)
    (OUT / f"fold_mean-{args.data}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
