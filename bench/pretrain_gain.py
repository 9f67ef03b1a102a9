"""Does jigsaw pretraining help when labels are few? mnist-writers, ~1,000 labelled train rows
(whole writers), pretraining on ALL train and test images (labels unused), 5 writer-grouped folds,
the same backbone and schedule trained (a) from scratch and (b) from the jigsaw weights, in one run.

Prints CV (OOF accuracy), fold mean ± std of both and the difference.

    python bench/pretrain_gain.py [--labelled 1000] [--backbone resnet10t] [--pretrain-epochs 2] [--epochs 15]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import OUT, SHARED, mnist_overrides, mnist_subset  # noqa: E402
from pipeline.config.loading import load_config  # noqa: E402
from pipeline.stages import (
    folds,
    pretrain,
    train,  # noqa: E402
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist-writers.yaml"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--labelled", type=int, default=1000)
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--size", type=int, default=30)
    ap.add_argument("--pretrain-epochs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--formulation", default="position")
    ap.add_argument("--max-images", type=int, default=0)
    args = ap.parse_args()
    root = mnist_subset(args.labelled, seed=1)
    work = OUT / "work"
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    model = [f"model.backbone={args.backbone}", f"data.image_size={args.size}"]
    t0 = time.time()
    # (pretext) every train and test image of the whole competition, labels unused
    pcfg = load_config(CONFIG, mnist_overrides(SHARED) + model + [
        f"name=jigsaw-{args.formulation}", f"pretrain.epochs={args.pretrain_epochs}",
        f"pretrain.formulation={args.formulation}", f"pretrain.max_images={args.max_images}"])
    weights = pretrain.run(pcfg)
    t_pre = time.time() - t0
    common = mnist_overrides(root) + model + [f"train.epochs={args.epochs}", "train.batch_size=64", "train.lr=0.001",
                                             "train.warmup_epochs=1",
                                             "train.augment=[{Affine: {translate_percent: [-0.08, 0.08], rotate: [-10, 10], "
                                             "p: 0.7}}]"]
    res = {}
    for tag, extra in (("scratch", []), ("jigsaw", [f"model.init={weights}"])):
        cfg = load_config(CONFIG, common + extra + [f"name=fewlabels-{args.labelled}-{tag}-{args.backbone}"])
        folds.run(cfg)
        res[tag] = train.run(cfg)
    print(f"\n=== jigsaw pretraining gain: {args.labelled} labelled rows (5 writer folds), {args.backbone} "
          f"{args.size}px, pretext {args.formulation} on all train+test images ({t_pre:.0f}s), "
          f"{args.epochs} epochs fine-tuning ===")
    for tag, s in res.items():
        print(f"{tag:8s}: OOF accuracy {s['oof_score']:.4f}   folds {s['cv_mean']:.4f} ± {s['cv_std']:.4f}   "
              + " ".join(f"{v:.3f}" for v in s["folds"].values()))
    diff = np.array(list(res["jigsaw"]["folds"].values())) - np.array(list(res["scratch"]["folds"].values()))
    print(f"difference (jigsaw - scratch): OOF {res['jigsaw']['oof_score'] - res['scratch']['oof_score']:+.4f}, "
          f"per fold {diff.mean():+.4f} ± {diff.std():.4f}, better in {(diff > 0).sum()}/5 folds")


if __name__ == "__main__":
    main()
