"""``make pretrain``: self-supervised jigsaw pretraining of the backbone on every train and test image.

Each image is cut into a ``grid``×``grid`` grid of tiles that are put back in a permuted order; the
network learns either which of N fixed permutations was used (``formulation: permutation``, the N
permutations chosen greedily for maximal Hamming distance, deterministic, saved beside the weights),
or for every position which tile sits there (``formulation: position``, a grid²×grid² output, as the
atmaCup11 author did). Random gaps/jitter between tiles and per-tile normalisation keep the network
from solving the puzzle from edge continuity alone; the 8 flip/rotation views of each image are
optional extra inputs. Training runs through the same loop as ``train`` (resume, AMP, DDP,
accumulation); the backbone weights (without the puzzle head) are written to ``pretrain.output``,
which ``train`` loads with ``model.init: <that path>``.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pipeline.competition.images import EpochSeed, build_transform, data_key, decode_size, read_image
from pipeline.competition.tables import image_paths, load_test, load_train
from pipeline.config.train import Train
from pipeline.errors import InputError
from pipeline.metrics import Metric
from pipeline.store import leaderboard
from pipeline.store.artifacts import ArtifactGroup, stage_lock
from pipeline.store.io import config_hash, is_up_to_date, log, provenance, resolved_config_text
from pipeline.store.paths import pretrain_file
from pipeline.training.build import load_backbone_weights
from pipeline.training.checkpoint import Checkpoint
from pipeline.training.models import Head, create_backbone
from pipeline.training.pretrained import with_normalization
from pipeline.training.trainer import FoldTrainer

if TYPE_CHECKING:
    from pipeline.config.schema import Config


def permutation_set(n: int, grid: int = 3, seed: int = 0) -> np.ndarray:
    """``n`` permutations of grid² tiles chosen greedily to maximise the minimal pairwise Hamming distance
    (Noroozi & Favaro); the identity is first. Deterministic for (n, grid, seed)."""
    k = grid * grid
    total = math.factorial(k)
    if n > total:
        raise InputError(f"pretrain.n_permutations={n} is more than the {total} possible orders of {k} tiles; "
                         f"lower it (or use a finer grid).")
    if n < 2:
        raise InputError("pretrain.n_permutations must be at least 2.")
    if total <= 200_000:
        pool = np.array(list(itertools.permutations(range(k))), dtype=np.int8)
    else:  # 9! = 362,880 orders: a seeded sample keeps this fast and still far apart
        rng = np.random.default_rng(seed)
        pool = np.array([rng.permutation(k) for _ in range(100_000)], dtype=np.int8)
        pool = np.unique(np.vstack([np.arange(k, dtype=np.int8)[None], pool]), axis=0)
    rng = np.random.default_rng(seed)
    identity = np.flatnonzero((pool == np.arange(k)).all(1))[0]
    chosen = [int(identity)]
    min_dist = (pool != pool[identity]).sum(1)
    for _ in range(n - 1):
        best = np.flatnonzero(min_dist == min_dist.max())
        pick = int(best[rng.integers(len(best))])
        chosen.append(pick)
        min_dist = np.minimum(min_dist, (pool != pool[pick]).sum(1))
    return pool[chosen].astype(np.int64)


def min_hamming(perms: np.ndarray) -> int:
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    np.fill_diagonal(d, perms.shape[1] + 1)
    return int(d.min())


def shuffle_tiles(img: torch.Tensor, perm, grid: int, gap: int = 0, offsets=None, tile_norm: bool = False) -> torch.Tensor:
    """Cut a CxHxW image into grid×grid cells, take a (cell-gap)² tile from each (at ``offsets`` or the
    centre), normalise each tile if asked, and place tile ``perm[p]`` at position ``p``."""
    c, h, w = img.shape
    cell_h, cell_w = h // grid, w // grid
    th, tw = cell_h - gap, cell_w - gap
    if th < 1 or tw < 1:
        raise InputError(f"pretrain: a {h}x{w} image cannot be cut into a {grid}x{grid} grid with gap {gap}; "
                         "raise data.image_size or lower pretrain.grid/pretrain.gap.")
    tiles = []
    for i in range(grid * grid):
        r, q = divmod(i, grid)
        oy, ox = offsets[i] if offsets is not None else (gap // 2, gap // 2)
        t = img[:, r * cell_h + oy: r * cell_h + oy + th, q * cell_w + ox: q * cell_w + ox + tw]
        if tile_norm:
            t = (t - t.mean()) / (t.std() + 1e-5)
        tiles.append(t)
    out = torch.empty(c, grid * th, grid * tw, dtype=img.dtype)
    for p, src in enumerate(perm):
        r, q = divmod(p, grid)
        out[:, r * th:(r + 1) * th, q * tw:(q + 1) * tw] = tiles[int(src)]
    return out


D4 = [(k, f) for f in (False, True) for k in range(4)]


class JigsawDataset(Dataset):
    """Puzzles from images: (shuffled image, target) where target is the permutation index
    (formulation 'permutation') or the tile index at each position ('position')."""

    def __init__(self, paths, cfg: Config, perms: np.ndarray, train: bool, seed: int = 0):
        pc = cfg.pretrain
        self.paths, self.perms, self.train = list(paths), perms, train
        self.grid, self.gap, self.tile_norm = pc.grid, pc.gap, pc.tile_norm
        self.position = pc.formulation == "position"
        self.dihedral = pc.dihedral
        self.in_chans, self.decode = cfg.data.in_chans, decode_size(cfg.data)
        self.transform = build_transform(with_normalization(cfg)["data"])  # as the fold models will see them
        self.epoch = EpochSeed(seed)  # shared with persistent loader workers
        self.size = cfg.data.image_size
        if self.size // self.grid - self.gap < 2:
            raise InputError(f"pretrain: data.image_size={self.size} is too small for a {self.grid}x{self.grid} grid "
                             f"with gap {self.gap} (tiles need at least 2 pixels); raise data.image_size.")

    def set_epoch(self, seed: int) -> None:
        self.epoch.set(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.epoch.get() if self.train else 12345, i])
        arr = read_image(self.paths[i], self.in_chans, self.decode)
        if min(arr.shape[:2]) < self.grid * 2:
            raise InputError(f"pretrain: image {self.paths[i]} is {arr.shape[1]}x{arr.shape[0]}, smaller than a "
                             f"{self.grid}x{self.grid} grid of 2-pixel tiles; lower pretrain.grid or drop it.")
        x = self.transform(image=arr)["image"]
        if self.dihedral and self.train:
            k, flip = D4[int(rng.integers(8))]
            x = torch.rot90(x, k, dims=(1, 2))
            if flip:
                x = torch.flip(x, dims=(2,))
        if self.position:
            idx = rng.permutation(self.grid * self.grid)
            perm, target = idx, torch.as_tensor(idx, dtype=torch.long)
        else:
            j = int(rng.integers(len(self.perms)))
            perm, target = self.perms[j], torch.tensor(j)
        offsets = None
        if self.train and self.gap:
            offsets = [tuple(rng.integers(0, self.gap + 1, 2)) for _ in range(self.grid * self.grid)]
        return shuffle_tiles(x, perm, self.grid, self.gap, offsets, self.tile_norm), {"puzzle": target}, i


def _position_accuracy(y, p):
    y = np.asarray(y)
    n = y.shape[1]
    return float((np.asarray(p).reshape(len(y), n, n).argmax(-1) == y).mean())


def _perm_accuracy(y, p):
    return float((np.asarray(p).argmax(1) == np.asarray(y)).mean())


MACHINE = ("device", "amp", "channels_last", "sync_bn")  # train keys the puzzle loop takes from the config


def run(cfg: Config, force: bool = False) -> Path:
    with stage_lock(pretrain_file(cfg)):
        return _run(cfg, force)


def _save_npy(path, array) -> None:
    with open(path, "wb") as f:  # np.save on a path would append ".npy" to the staged file's name
        np.save(f, array)


# (about 60 lines: the stage's story in order, inputs -> key -> up-to-date check -> the puzzle's loop -> one
# commit; the puzzle itself is JigsawDataset and the permutation helpers above)
def _run(cfg: Config, force: bool) -> Path:
    pc = cfg.pretrain
    out = pretrain_file(cfg)
    id_col = cfg.competition.id
    train_df, test_df = load_train(cfg), load_test(cfg)
    images = pd.DataFrame({"id": pd.concat([train_df[id_col], test_df[id_col]], ignore_index=True),
                           "path": image_paths(cfg, train_df[id_col], "train") + image_paths(cfg, test_df[id_col], "test")})
    if pc.max_images:
        images = images.sample(n=min(pc.max_images, len(images)), random_state=cfg.seed).reset_index(drop=True)
    ids = images["id"]
    start = [cfg.model.pretrained] if cfg.model.pretrained else []  # (unset: keys of before stay)
    key = config_hash([pc, data_key(cfg.data), cfg.model.backbone, cfg.seed, len(ids),
                       cfg.competition.root, *start])
    meta_path = out.with_suffix(".json")
    if not force and is_up_to_date(meta_path, key, [out]):
        log(f"[pretrain] up to date: {out}")
        return out
    import time

    started = time.time()
    perms = permutation_set(pc.n_permutations, pc.grid, cfg.seed)
    n_valid = max(1, int(len(ids) * pc.valid_fraction))
    order = np.random.default_rng(cfg.seed).permutation(len(ids))
    va_idx, tr_idx = order[:n_valid], order[n_valid:]
    paths = list(images["path"])
    train_ds = JigsawDataset([paths[i] for i in tr_idx], cfg, perms, train=True, seed=cfg.seed)
    valid_ds = JigsawDataset([paths[i] for i in va_idx], cfg, perms, train=False)
    y_valid = np.stack([valid_ds[i][1]["puzzle"].numpy() for i in range(len(valid_ds))])
    if pc.formulation == "position":
        k = pc.grid ** 2
        head, metric = Head("puzzle", [], "position", k * k), Metric("tile_accuracy", _position_accuracy, True)
    else:
        head, metric = Head("puzzle", [], "multiclass", len(perms)), Metric("puzzle_accuracy", _perm_accuracy, True)
    # the puzzle's own loop: the train section's defaults, the pretrain section's schedule, and only the
    # machine's choices (device, AMP, memory layout) from the config's train section
    loop = Train(epochs=pc.epochs, batch_size=pc.batch_size, lr=pc.lr, optimizer=pc.optimizer,
                 scheduler=pc.scheduler, **{k: getattr(cfg.train, k) for k in MACHINE})
    work = out.parent / f"{out.stem}_run"
    frame = pd.DataFrame({id_col: ids})
    log(f"[pretrain] jigsaw {pc.grid}x{pc.grid} ({pc.formulation}, {len(perms)} permutations, min Hamming "
        f"distance {min_hamming(perms)}) on {len(tr_idx)} images (+{len(va_idx)} held out), backbone "
        f"{cfg.model.backbone}")
    trainer = FoldTrainer(cfg, [head], frame, tr_idx, va_idx, "pretrain", work, key, "n/a",
                          datasets=(train_ds, valid_ds, y_valid), metric=metric, train=loop, init=pc.init)
    result = trainer.fit()
    if not trainer.dist.main:
        return out
    backbone_state = Checkpoint.read(work / "best.pt").backbone_weights()
    with ArtifactGroup(meta_path) as group:
        staged = group.add(out, lambda tmp: torch.save(backbone_state, tmp))
        group.add(out.with_name(out.stem + "_permutations.npy"), lambda tmp: _save_npy(tmp, perms))
        group.text(out.with_name(out.stem + ".config.yaml"), resolved_config_text(cfg))
        check = create_backbone(cfg.model.backbone, cfg.data.in_chans)
        report = load_backbone_weights(check, staged)
        group.commit(provenance(cfg, "pretrain", key, result=result, load_report=str(report),
                                min_hamming=min_hamming(perms), images=int(len(ids))))
    leaderboard.record(cfg, "pretrain", started, experiment=f"{cfg.name}:pretrain", artifacts=[str(out)],
                       note=f"{metric.name} {result['best']:.4f} (puzzle, not the competition metric)")
    log(f"[pretrain] best {metric.name} {result['best']:.4f} at epoch {result['best_epoch']}; wrote {out} "
        f"({report}); use it with model.init={out}")
    return out
