"""Loader images/s against model images/s at a real size: RGB JPEGs (as Kaggle ships them, larger than the
model's input) decoded, resized and normalised by the pipeline's own dataset and transform, against one
training step (forward + backward) of a timm model at that size. All measured in the same run.

    python bench/loader_throughput.py                      # 256 JPEGs of 384 px, model input 224, resnet18
    python bench/loader_throughput.py --workers 0 1 --backbone resnet50 --source 512

It prints, per decode mode (full decode then resize, or PIL's draft mode: ``data.jpeg_draft``) and loader
worker count, the loader's img/s and its ratio to the model's img/s: a ratio under 1 means the model waits
for images (add ``data.num_workers``, lower the source size, or cache).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.competition.images import ImageDataset, build_transform  # noqa: E402
from pipeline.training.models import Head, Net, create_backbone  # noqa: E402


def make_jpegs(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        # smooth content (a photo compresses like this; white noise would be an unrealistically slow JPEG)
        small = rng.integers(0, 255, (size // 16, size // 16, 3)).astype(np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        paths.append(folder / f"{i:05d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def loader_rate(paths, image_size: int, draft: bool, workers: int, batch: int) -> float:
    dcfg = {"in_chans": 3, "image_size": image_size, "mean": None, "std": None}
    aug = [{"HorizontalFlip": {"p": 0.5}}]
    ds = ImageDataset(paths, 3, build_transform(dcfg, aug, seed=0), size=image_size if draft else None)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers)
    t0, n = time.perf_counter(), 0
    for x, _, _ in loader:
        n += len(x)
    return n / (time.perf_counter() - t0)


def model_rate(backbone: str, image_size: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    net = Net(create_backbone(backbone, 3, image_size), [Head("target", ["target"], "multiclass", 10)])
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    x, y = torch.randn(batch, 3, image_size, image_size), torch.randint(0, 10, (batch,))
    net.train()

    def step():
        loss = torch.nn.functional.cross_entropy(net(x)["target"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--source", type=int, default=384, help="JPEG side in pixels")
    ap.add_argument("--size", type=int, default=224, help="model input (data.image_size)")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.images, args.source)
        model = model_rate(args.backbone, args.size, args.batch, args.steps)
        print(f"{args.images} RGB JPEGs {args.source}x{args.source} -> {args.size}x{args.size}, "
              f"{torch.get_num_threads()} torch threads")
        print(f"model {args.backbone} train step (fwd+bwd, batch {args.batch}): {model:8.1f} img/s")
        full0 = None
        for workers in args.workers:
            for draft in (False, True):
                rate = loader_rate(paths, args.size, draft, workers, args.batch)
                full0 = full0 or rate
                print(f"loader {'draft' if draft else 'full '} decode, {workers} worker(s): {rate:8.1f} img/s "
                      f"= {rate / model:5.2f}x the model, {rate / full0:4.2f}x full decode with 0 workers")


if __name__ == "__main__":
    main()
