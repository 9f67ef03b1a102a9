"""Images/s of one training epoch of this pipeline vs a minimal hand-written PyTorch loop.

Same model, batch, data (the same in-memory dataset and transforms), same optimizer, measured in
the same run, alternating, median of the repeats; prints both and their ratio (target >= 0.95 on
CPU). Also prints the data loader's own images/s with the default workers, and on CUDA the AMP +
channels_last figures.

    python bench/train_throughput.py [--backbone resnet18] [--batch 64] [--size 32] [--rows 2048] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import OUT, bench_trainer, synthetic_competition  # noqa: E402
from pipeline.training.build import build_model  # noqa: E402


def hand_loop(model, loader, device, amp_dtype=None, channels_last=False) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    model.train()
    n, t0 = 0, time.perf_counter()
    for x, y, _ in loader:
        x, t = x.to(device, non_blocking=True), y["target"].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x)["target"], t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def measure(args, extra: list[str]):
    root = synthetic_competition(OUT / f"throughput{args.size}-{args.rows}", n=args.rows, size=args.size)
    cfg, heads, trainer = bench_trainer(root, f"model.backbone={args.backbone}", f"train.batch_size={args.batch}",
                                        f"data.image_size={args.size}", *extra)
    device = trainer.device
    hand_model = build_model(cfg, heads).to(device)
    if cfg.train.channels_last:
        hand_model = hand_model.to(memory_format=torch.channels_last)
    cache, trainer.train_ds._cache = trainer.train_ds._cache, None  # first: decode every image from disk
    t0 = time.perf_counter()
    n = sum(len(x) for x, _, _ in trainer.loader(trainer.train_ds, shuffle=True, epoch=0))
    disk_ips = n / (time.perf_counter() - t0)
    trainer.train_ds._cache = cache
    loader = trainer.loader(trainer.train_ds, shuffle=True, epoch=0)
    for _ in loader:  # fill the image cache so both sides read from memory
        pass
    t0 = time.perf_counter()
    n = sum(len(x) for x, _, _ in loader)
    loader_ips = n / (time.perf_counter() - t0)
    trainer.train_epoch(0)  # warm-up
    hand_loop(hand_model, loader, device, trainer.amp_dtype, cfg.train.channels_last)
    ours, hand = [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        trainer.train_epoch(r + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ours.append(len(trainer.train_ds) / (time.perf_counter() - t0))
        hand.append(hand_loop(hand_model, trainer.loader(trainer.train_ds, True, r + 1), device, trainer.amp_dtype,
                              cfg.train.channels_last))
    return statistics.median(ours), statistics.median(hand), (loader_ips, disk_ips, loader.num_workers), device


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    ours, hand, loader_ips, device = measure(args, ["train.amp=false"])
    print(f"device {device}, {args.backbone}, batch {args.batch}, {args.size}x{args.size}, {args.rows} images/epoch, "
          f"median of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"pipeline train step : {ours:8.1f} images/s")
    print(f"hand-written loop   : {hand:8.1f} images/s")
    print(f"ratio pipeline/hand : {ours / hand:8.3f}   (target >= 0.95)")
    cached, disk, workers = loader_ips
    print(f"data loader alone   : {cached:8.1f} images/s from memory, {disk:8.1f} decoding PNGs from disk with "
          f"data.num_workers=auto -> {workers} ({'faster' if disk > ours else 'SLOWER'} than the model)")
    if device.type == "cuda":
        print(f"GPU {torch.cuda.get_device_name()}; the rows above are fp32")
        for label, extra in (("AMP (bf16/fp16 autocast)", ["train.amp=true"]),
                             ("AMP + channels_last", ["train.amp=true", "train.channels_last=true"])):
            ours, hand, _, _ = measure(args, extra)
            print(f"CUDA {label:26s}: pipeline {ours:8.1f}, hand {hand:8.1f} images/s, ratio {ours / hand:.3f}")


if __name__ == "__main__":
    main()
