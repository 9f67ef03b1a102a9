"""Views/s of d4 TTA inference: all views stacked into one batch vs one forward pass per view.

Same model, data and batch, measured in the same run (alternating, median of repeats); prints both
and the ratio (batched must never be slower on CPU). On CUDA it also reports batch 32.

    python bench/tta_speed.py [--backbone resnet18] [--batch 32] [--images 512]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.predict.tta import predict_views, tta_views  # noqa: E402
from pipeline.training.models import Head, Net, create_backbone, pick_device  # noqa: E402


@torch.no_grad()
def per_view_loop(model, heads, loader, views, device):
    for x, _, _ in loader:
        x = x.to(device)
        for v in views:
            out = model(v(x))
            for h in heads:
                out[h.name].softmax(-1).cpu()


def timed(fn, device):
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(backbone, batch, n, size, repeats, device):
    torch.manual_seed(0)
    heads = [Head("target", ["target"], "multiclass", 10)]
    model = Net(create_backbone(backbone, 3), heads).to(device).eval()
    x = torch.rand(n, 3, size, size)
    loader = DataLoader(TensorDataset(x, torch.zeros(n), torch.arange(n)), batch_size=batch,
                        collate_fn=lambda b: (torch.stack([t[0] for t in b]), {}, None))
    views = tta_views("d4")
    predict_views(model, heads, loader, views, device)  # warm-up
    per_view_loop(model, heads, loader, views, device)
    batched, looped = [], []
    for _ in range(repeats):
        batched.append(n * len(views) / timed(lambda: predict_views(model, heads, loader, views, device), device))
        looped.append(n * len(views) / timed(lambda: per_view_loop(model, heads, loader, views, device), device))
    return statistics.median(batched), statistics.median(looped)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = pick_device()
    b, lat = run(args.backbone, args.batch, args.images, args.size, args.repeats, device)
    print(f"device {device}, {args.backbone}, d4 (8 views), batch {args.batch}, {args.size}x{args.size}, "
          f"{args.images} images, median of {args.repeats}")
    print(f"batched views   : {b:9.1f} views/s")
    print(f"loop over views : {lat:9.1f} views/s")
    print(f"ratio batched/loop: {b / lat:.3f}  (must be >= 1 on CPU)")


if __name__ == "__main__":
    main()
