"""Where a training epoch's time goes: the pipeline's epoch against bare loops over the same loader, measured in one
process, alternating, median of the repeats.

Rows: a hand loop (its own model, one-group Adam, plain cross-entropy); a bare loop over the trainer's own model,
optimizer and criterion; the same bare loop with the loader wrapped in ``tqdm.auto.tqdm`` (how ``train_epoch``
showed progress before: that bar calls iter() on the loader when it is made, so every epoch started the loader's
workers twice); and ``FoldTrainer.train_epoch``. For each: images/s, how many times the loader was iterated
per epoch, and for the loops, seconds to the first batch.

    python bench/train_step_parts.py [--rows 4096] [--batch 128] [--size 32] [--repeats 5] [--workers auto]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import OUT, bench_trainer, synthetic_competition  # noqa: E402
from pipeline.training.build import build_model  # noqa: E402

ITERS = [0]
_real_iter = DataLoader.__iter__


def _counting_iter(self):
    ITERS[0] += 1
    return _real_iter(self)


DataLoader.__iter__ = _counting_iter


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", default="auto")
    args = ap.parse_args()
    from tqdm.auto import tqdm

    root = synthetic_competition(OUT / f"throughput{args.size}-{args.rows}", n=args.rows, size=args.size)
    cfg, heads, tr = bench_trainer(root, "model.backbone=resnet18", f"train.batch_size={args.batch}",
                                   f"data.image_size={args.size}", f"data.num_workers={args.workers}", "train.amp=false")
    dev = tr.device
    hand_model = build_model(cfg, heads).to(dev)
    hand_opt = torch.optim.Adam(hand_model.parameters(), lr=3e-4)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def bare(epoch, model, opt, criterion, wrap=False):
        loader = tr.loader(tr.train_ds, True, epoch)
        model.train()
        t0, first, n = time.perf_counter(), None, 0
        for x, y, _ in (tqdm(loader, leave=False, mininterval=1) if wrap else loader):
            first = first or time.perf_counter() - t0
            x, t = x.to(dev, non_blocking=True), y["target"].to(dev, non_blocking=True)
            out = model(x)
            loss = F.cross_entropy(out["target"], t) if criterion is None else criterion(out, {"target": t})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(x)
        sync()
        return n / (time.perf_counter() - t0), first

    def pipeline_epoch(epoch):
        t0 = time.perf_counter()
        tr.train_epoch(epoch)
        sync()
        return len(tr.train_ds) / (time.perf_counter() - t0), float("nan")

    rows = {"hand loop (own model, Adam, F.cross_entropy)": lambda e: bare(e, hand_model, hand_opt, None),
            "bare loop, trainer's model/optimizer/criterion": lambda e: bare(e, tr.model, tr.opt, tr.criterion),
            "  same, loader wrapped in tqdm.auto (before)": lambda e: bare(e, tr.model, tr.opt, tr.criterion, True),
            "FoldTrainer.train_epoch": pipeline_epoch}
    for f in rows.values():  # warm-up: cuDNN autotuning, first CUDA allocations
        f(0)
    res = {k: [] for k in rows}
    for r in range(args.repeats):
        for k, f in rows.items():
            ITERS[0] = 0
            ips, first = f(r + 1)
            res[k].append((ips, first, ITERS[0]))
    print(f"device {dev}{' ' + torch.cuda.get_device_name() if dev.type == 'cuda' else ''}, resnet18, {args.rows} images, "
          f"batch {args.batch}, {args.size}px, loader workers {tr.loader(tr.train_ds, True, 0).num_workers}, "
          f"median of {args.repeats}")
    ref = statistics.median(a for a, _, _ in res[next(iter(rows))])
    print(f"{'':48s} {'images/s':>9s} {'vs hand':>8s} {'first batch s':>14s} {'loader iter()s':>15s}")
    for k, v in res.items():
        ips = statistics.median(a for a, _, _ in v)
        first = statistics.median(b for _, b, _ in v)
        print(f"{k:48s} {ips:9.0f} {ips / ref:8.3f} {first:14.3f} {max(c for _, _, c in v):15d}")


if __name__ == "__main__":
    main()
