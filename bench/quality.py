"""Quality benchmark on mnist-writers: a hand-written baseline vs the pipeline's recipe, plus an ablation.

    python bench/quality.py [--rows 10000] [--epochs 3] [--folds 5] [--only baseline,p0,...]

A subset of the train rows (whole writers, so groups stay whole; stated in the report) and the FULL
test.csv scored against solution.csv (public/private). Every row reports CV (OOF), fold std, local
public/private, wall time and |CV - private|:

  (a) baseline  about 60 hand-written lines below: timm resnet18 from scratch, StratifiedGroupKFold by
                writer, Adam 3e-4 with one-cycle, fold-mean on test.
  (b) recipe    the pipeline built only from config switches, within the baseline's wall time (±10%);
                b2 spends the same time on two seeds of (b) at half the epochs, blended at level 2;
                bf trains (b)'s fold models (for CV) and one model on all rows that alone predicts test;
                b+ spends more time (two nets, a pseudo-label round, level 2).
  (c) ablation  (b) without each of its switches (b-aug, b-ema); each switch of (b) on its own on top of
                the pipeline's plain run (p0); the other switches (multi-scale TTA, level 2, post-processing,
                pseudo-labels, jigsaw, distillation) on top of p0.

The submission averages the 5 fold models, so its private accuracy runs above the single-model OOF CV;
the '1-model' column (each fold model alone on the test set, averaged) separates that gain from a CV
that misjudges the test set. Results go to bench/out/quality-mnist<rows>.json (rows from earlier --only
runs are kept).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import OUT, SHARED, mnist_subset  # noqa: E402


# ----------------------------------------------------------------------------------- (a) baseline
def baseline(root: Path, epochs: int, n_folds: int, seed: int = 0) -> dict:
    import timm
    from PIL import Image
    from sklearn.model_selection import StratifiedGroupKFold

    torch.manual_seed(seed)
    train = pd.read_csv(root / "train.csv", dtype={"id": str})
    test = pd.read_csv(root / "test.csv", dtype={"id": str})

    def load(ids):  # 28x28 gray -> float tensor in [-1, 1]
        a = np.stack([np.asarray(Image.open(SHARED / "images" / f"{i}.png").convert("L")) for i in ids])
        return torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 127.5 - 1

    X, Xt, y = load(train["id"]), load(test["id"]), torch.tensor(train["target"].to_numpy())
    oof, test_prob = np.zeros((len(train), 10)), np.zeros((len(test), 10))
    folds = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(X, y, train["writer"])
    fold_of, one_model = np.zeros(len(train), int), []
    for k, (tr, va) in enumerate(folds):
        fold_of[va] = k
        model = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
        opt = torch.optim.Adam(model.parameters(), lr=3e-4)
        steps = epochs * int(np.ceil(len(tr) / 64))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-4, total_steps=steps)
        for _ in range(epochs):
            model.train()
            for b in torch.randperm(len(tr)).split(64):
                if len(b) < 2:  # BatchNorm cannot train on a last batch of one row
                    continue
                idx = torch.as_tensor(tr)[b]
                loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            oof[va] = torch.cat([model(X[torch.as_tensor(va)[b]]).softmax(-1) for b in
                                 torch.arange(len(va)).split(512)]).numpy()
            fold_prob = torch.cat([model(Xt[b]).softmax(-1) for b in torch.arange(len(Xt)).split(512)]).numpy()
        test_prob += fold_prob
        one_model.append(score(root, test["id"], fold_prob.argmax(1))["private"])
    pred = test_prob.argmax(1)
    fold_scores = [float((oof[fold_of == k].argmax(1) == y.numpy()[fold_of == k]).mean()) for k in range(n_folds)]
    return {"cv": float((oof.argmax(1) == y.numpy()).mean()), "folds": fold_scores,
            "one_model_private": float(np.mean(one_model)), **score(root, test["id"], pred)}


def score(root: Path, ids, pred) -> dict:
    sol = pd.read_csv(root / "solution.csv", dtype={"id": str}).set_index("id").loc[list(ids)]
    hit = sol["target"].to_numpy() == np.asarray(pred)
    pub = (sol["Usage"] == "Public").to_numpy()
    return {"public": float(hit[pub].mean()), "private": float(hit[~pub].mean())}


# ------------------------------------------------------------------------------- (b, c) pipeline
BASE = ["competition.name=mnistq", f"competition.image={SHARED}/images/{{id}}.png", "competition.group=writer",
        "competition.tabular=[series]",
        "competition.categorical=[series]", "competition.check_images=exists", "data.in_chans=1",
        "data.image_size=28", "train.batch_size=64", "leaderboard.enabled=true"]
AFFINE = "train.augment=[{Affine: {translate_percent: [-0.08, 0.08], scale: [0.9, 1.1], rotate: [-10, 10], p: 0.7}}]"
P0 = ["model.backbone=resnet18", "train.lr=3e-4", "train.scheduler=cosine", "train.warmup_epochs=1"]
EMA = "train.ema=true", "train.ema_decay=0.99"


def pipeline_run(root: Path, name: str, epochs: int, n_folds: int, level1: list[list[str]], stack: bool,
                 post: bool, pseudo: list[str] | None = None, distill: list[str] | None = None,
                 jigsaw: list[str] | None = None, knn: list[str] | None = None) -> dict:
    """Level-1 experiments (+ optional jigsaw init, one pseudo-label or distillation round, level 2,
    post-processing) in one workdir; everything is timed, pretraining included."""
    from pipeline import load_config, run_stage

    work = OUT / f"quality-{root.name}-{name}"
    common = [f"competition.root={root}", f"workdir={work}", f"folds.n_splits={n_folds}", f"train.epochs={epochs}",
              *BASE]
    if jigsaw is not None:  # self-supervised pretext on train + test images, labels unused
        weights = run_stage("pretrain", load_config(None, [*common, f"name={name}-jigsaw", *level1[0], *jigsaw]))
        level1 = [[*extra, f"model.init={weights}"] for extra in level1]
    names = []
    for i, extra in enumerate(level1):
        exp = f"{name}-l1-{i}"
        cfg = load_config(None, [*common, f"name={exp}", *extra])
        for stage in ("folds", "train", "features"):
            run_stage(stage, cfg)
        names.append(exp)
        if (pseudo or distill) and i == 0:  # round 1: the first experiment again, taught by its own fold-k models
            exp = f"{name}-l1-{i}-r1"
            teach = [f"train.pseudo.source={names[0]}", *pseudo] if pseudo else [f"train.distill.teacher={names[0]}",
                                                                                  *distill]
            cfg = load_config(None, [*common, f"name={exp}", *extra, *teach])
            run_stage("train", cfg)
            run_stage("features", cfg)
            names[0] = exp
    final = names[-1] if len(names) == 1 else None
    if knn is not None:  # the one experiment's embeddings, searched fold by fold (make knn): submitted instead
        run_stage("knn", load_config(None, [*common, f"name={names[0]}", *level1[0], *knn]))
        final = f"{names[0]}-knn"
    if stack:
        cfg = load_config(None, [*common, f"name={name}", f"stack.experiments=[{', '.join(names)}]",
                                 "stack.model=auto", f"stack.name={name}-l2"])
        run_stage("stack", cfg)
        final = f"{name}-l2"
    if post:
        cfg = load_config(None, [*common, f"name={name}", f"postprocess.source={final}", "postprocess.class_scale=true"])
        run_stage("postprocess", cfg)
        final = f"{final}-pp"
    cfg = load_config(None, [*common, f"name={name}", f"submit.source={final or names[0]}"])
    sub = run_stage("submit", cfg)
    summary = json.loads(sub.with_name(sub.name.split(".csv")[0] + ".json").read_text())
    cv_file = work / "features" / (final or names[0]) / "cv.json"
    cv = json.loads(cv_file.read_text())
    folds = [v["tta"] for k, v in cv.items() if k.startswith("fold")]
    one = None
    test_folds = work / "features" / (final or names[0]) / "test_folds.parquet"
    if test_folds.exists():  # each fold model alone on the test set (level 1 only)
        t = pd.read_parquet(test_folds)
        cols = [c for c in t.columns if c.endswith("__mean")]
        one = float(np.mean([score(root, g["id"], g[cols].to_numpy().argmax(1))["private"]
                             for k, g in t.groupby("fold") if k != "full"]))  # the fold models
    return {"cv": cv["overall"]["tta"], "folds": folds, "one_model_private": one, **summary["local"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    root = mnist_subset(args.rows)
    n_rows = len(pd.read_csv(root / "train.csv"))
    e = args.epochs
    small = ["model.backbone=resnet10t", "train.lr=1e-3", "train.scheduler=cosine", "train.warmup_epochs=1"]
    # a 0.37M-parameter resnet runs 4x the baseline's epochs in its time (valid_from, cache: time savers only)
    eb = 4 * e
    def tiny_net(epochs: int) -> list[str]:  # scored at its last epoch only
        return ["model.backbone=test_resnet", "train.batch_size=128", "train.lr=3e-3", "train.scheduler=cosine",
                "train.warmup_epochs=1", f"train.valid_from={epochs}", "data.cache=true"]

    tiny = tiny_net(eb)
    rows = {
        "a  baseline (hand-written, resnet18)": lambda: baseline(root, e, args.folds),
        "p0 pipeline, same recipe as (a)": lambda: pipeline_run(root, "p0", e, args.folds, [P0], False, False),
        "b  equal time: tiny net, 4x epochs, lr 3e-3, aug, EMA": lambda: pipeline_run(
            root, "b", eb, args.folds, [tiny + [AFFINE, *EMA]], False, False),
        "b2 equal time: two tiny nets (2x epochs, seeds 42/43), level 2": lambda: pipeline_run(
            root, "b2", 2 * e, args.folds, [[*tiny_net(2 * e), AFFINE, *EMA, f"seed={s}"] for s in (42, 43)], True, False),
        "bf (b) at 3/4 the epochs + an all-data model alone on test": lambda: pipeline_run(
            root, "bf", eb * 3 // 4, args.folds,
            [[*tiny_net(eb * 3 // 4), AFFINE, *EMA, "train.full=true", "features.use_full=only"]], False, False),
        "b' previous (b): resnet10t, lr 1e-3, aug, EMA, +1 epoch": lambda: pipeline_run(
            root, "b'", e + 1, args.folds, [small + [AFFINE, *EMA, f"train.valid_from={e + 1}", "data.cache=true"]],
            False, False),
        "bm (b) with an ArcFace head (model.head=arcface, scale 16): softmax vs margin at equal time": lambda: pipeline_run(
            root, "bm", eb, args.folds, [tiny + [AFFINE, *EMA, "model.head=arcface", "model.head_scale=16"]], False,
            False),
        # (bk, bsk: bm's and b's own workdirs, so their fold models are reused when they are there; the wall is
        # then the kNN pass's alone)
        "bk (bm) + kNN on its embeddings (make knn, k 20), submitted instead of its softmax": lambda: pipeline_run(
            root, "bm", eb, args.folds, [tiny + [AFFINE, *EMA, "model.head=arcface", "model.head_scale=16"]], False,
            False, knn=["knn.k=20"]),
        "bsk (b) + kNN on its softmax-trained embeddings (k 20)": lambda: pipeline_run(
            root, "b", eb, args.folds, [tiny + [AFFINE, *EMA]], False, False, knn=["knn.k=20"]),
        "b-aug  (b) without the augmentation": lambda: pipeline_run(root, "b-aug", eb, args.folds, [tiny + [*EMA]],
                                                                   False, False),
        "b-ema  (b) without EMA": lambda: pipeline_run(root, "b-ema", eb, args.folds, [tiny + [AFFINE]], False, False),
        "b+ more time: 2 small nets (aug, EMA) + pseudo round + level 2": lambda: pipeline_run(
            root, "bplus", e + 1, args.folds, [small + [AFFINE, *EMA], small + [AFFINE, *EMA, "data.image_size=32",
                                                                            "model.pool=gem"]],
            True, False, pseudo=["train.pseudo.threshold=0.98", "train.pseudo.weight=0.5"]),
        "c0 p0 + tiny net, 4x epochs, bs 128, lr 3e-3 (same time)": lambda: pipeline_run(root, "c0", eb, args.folds,
                                                                                           [tiny], False, False),
        "c0' p0 + resnet10t, lr 1e-3, +1 epoch (same time)": lambda: pipeline_run(root, "c0'", e + 1, args.folds,
                                                                                   [small], False, False),
        "c1 p0 + affine augmentation": lambda: pipeline_run(root, "c1", e, args.folds, [P0 + [AFFINE]], False, False),
        "c2 p0 + EMA weights": lambda: pipeline_run(root, "c2", e, args.folds, [P0 + [*EMA]], False, False),
        "c3 p0 + multi-scale TTA": lambda: pipeline_run(root, "c3", e, args.folds, [P0 + ["features.scales=[0.9, 1.0, 1.1]"]],
                                                        False, False),
        "c4 p0 + a second experiment + level 2 (auto)": lambda: pipeline_run(
            root, "c4", e, args.folds, [P0, small + ["data.image_size=32"]], True, False),
        "c5 p0 + post-processing (class scale)": lambda: pipeline_run(root, "c5", e, args.folds, [P0], False, True),
        "c6 p0 + one pseudo-label round": lambda: pipeline_run(root, "c6", e, args.folds, [P0], False, False,
                                                               pseudo=["train.pseudo.threshold=0.98"]),
        "c7 p0 + jigsaw pretraining init (1 epoch, 8k images)": lambda: pipeline_run(
            root, "c7", e, args.folds, [P0], False, False,
            jigsaw=["pretrain.epochs=1", "pretrain.max_images=8000", "pretrain.batch_size=64"]),
        "c8 p0 + one distillation round (alpha 0.5, T 2)": lambda: pipeline_run(
            root, "c8", e, args.folds, [P0], False, False, distill=["train.distill.alpha=0.5",
                                                                    "train.distill.temperature=2"]),
    }
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    report = OUT / f"quality-{root.name}.json"  # rows of earlier invocations (--only) are kept
    results = json.loads(report.read_text()) if report.exists() else {}
    for label, fn in rows.items():
        if only and label.split()[0] not in only:
            continue
        t0 = time.time()
        r = fn()
        r["wall_s"] = time.time() - t0
        results[label] = r
        print(f"[quality] {label}: CV {r['cv']:.4f} (fold std {np.std(r['folds']):.4f}), public {r['public']:.4f}, "
              f"private {r['private']:.4f}, |CV-private| {abs(r['cv'] - r['private']):.4f} ({r['wall_s']:.0f} s)",
              flush=True)
        report.write_text(json.dumps(results, indent=2))
    print(f"\nmnist-writers, {n_rows} train rows (whole writers), full test (12,101 rows), {args.folds} folds, "
          f"{e} epochs for (a)/(c), torch threads {torch.get_num_threads()}")
    print("1-model private: the mean private accuracy of the fold models alone (the submission averages them)")
    print(f"{'row':62s} {'CV':>7s} {'fold std':>8s} {'public':>7s} {'private':>7s} {'|CV-priv|':>9s} "
          f"{'1-model':>7s} {'|CV-1m|':>7s} {'wall s':>7s}")
    for label, r in sorted(results.items(), key=lambda kv: list(rows).index(kv[0]) if kv[0] in rows else len(rows)):
        one = r.get("one_model_private")
        one_s = f"{one:7.4f} {abs(r['cv'] - one):7.4f}" if one is not None else f"{'-':>7s} {'-':>7s}"
        print(f"{label:62s} {r['cv']:7.4f} {np.std(r['folds']):8.4f} {r['public']:7.4f} {r['private']:7.4f} "
              f"{abs(r['cv'] - r['private']):9.4f} {one_s} {r['wall_s']:7.0f}")
    report.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
