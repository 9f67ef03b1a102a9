"""Reading competition images and turning them into tensors, shared by pretrain, train and features.

Augmentations are declared in the config as albumentations transforms by name, e.g.
``[{HorizontalFlip: {p: 0.5}}, {CoarseDropout: {p: 0.3}}]``; resize, normalisation and the
tensor conversion are appended by the pipeline.
"""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.errors import InputError


def read_image(path: str | Path, in_chans: int, size: int | None = None) -> np.ndarray:
    """HxWxC uint8 array; a missing or unreadable file is named in the error. With ``size``, a JPEG is decoded
    straight at the smallest of its 1/2, 1/4, 1/8 scales that still covers ``size`` x ``size`` (PIL's draft
    mode: the transform's resize then starts from far fewer pixels; bench/loader_throughput.py)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if size and img.format == "JPEG":
                img.draft("L" if in_chans == 1 else "RGB", (size, size))
            arr = to_uint8(img, in_chans, path)
    except FileNotFoundError:
        raise InputError(f"image file {path} does not exist; check competition.image and the images folder.") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"image file {path} cannot be read ({exc}); replace or remove that row.") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def to_uint8(img, in_chans: int, path) -> np.ndarray:
    """Any PIL mode as 8-bit L (in_chans 1) or RGB, scaled by its own range, never clipped: 16-bit
    (I;16*, and I holding 0..65535) is divided by 257; float (F) in 0..1 is times 255, in 0..255 as is;
    palette (P) through its colours; alpha (RGBA, LA, PA) composited over black; CMYK and YCbCr through
    PIL's conversion. Anything else is refused, naming the file and the mode."""
    from PIL import Image

    mode = img.mode
    want = "L" if in_chans == 1 else "RGB"
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255.0
        elif mode.startswith("I;16") or (lo >= 0 and hi <= 65535 and mode == "I" and hi > 255):
            a = a / 257.0
        elif not (lo >= 0 and hi <= 255):
            raise InputError(f"image file {path}: mode {mode} with values {lo:g}..{hi:g} has no known 8-bit "
                             "scale; convert it to 8 or 16 bits per channel")
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    elif mode in ("RGBA", "LA", "PA", "P") or "A" in img.getbands():
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        img = Image.fromarray(np.rint(rgba[..., :3] * rgba[..., 3:4] / 255.0).astype(np.uint8), mode="RGB")
    try:
        return np.asarray(img.convert(want))
    except ValueError as exc:
        raise InputError(f"image file {path}: PIL mode {mode} cannot be converted to {want} ({exc}); save it as "
                         "8-bit grayscale or RGB") from None


def norm_stats(data_cfg: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    c = data_cfg["in_chans"]
    mean = tuple(data_cfg["mean"] or (0.5,) * c)
    std = tuple(data_cfg["std"] or (0.5,) * c)
    return mean, std


def build_transform(data_cfg: dict, augment: list | None = None, size: int | None = None, seed: int | None = None):
    """albumentations Compose: the configured augmentations, then resize, normalise, to tensor."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    size = size or data_cfg["image_size"]
    steps = []
    for item in augment or []:
        name, kwargs = (item, {}) if isinstance(item, str) else next(iter(item.items()))
        cls = getattr(A, name, None)
        if cls is None or not isinstance(cls, type):
            close = difflib.get_close_matches(name, [n for n in dir(A) if n[:1].isupper()], n=3)
            raise InputError(f"train.augment: unknown albumentations transform '{name}'"
                             + (f"; did you mean {', '.join(close)}?" if close else "."))
        if name in ("RandomResizedCrop", "RandomCrop", "CenterCrop") and "size" not in kwargs and "height" not in kwargs:
            kwargs = {"size": (size, size), **kwargs}
        steps.append(cls(**(kwargs or {})))
    mean, std = norm_stats(data_cfg)
    steps += [A.Resize(size, size), A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(steps, seed=seed)


class EpochSeed:
    """The current epoch's augmentation seed in shared memory: loader workers that persist between epochs keep
    their copy of the dataset, and read the seed the main process set for the epoch from here."""

    def __init__(self, seed: int = 0):
        self._value = torch.full((1,), int(seed), dtype=torch.int64).share_memory_()

    def set(self, seed: int) -> None:
        self._value[0] = int(seed)

    def get(self) -> int:
        return int(self._value[0])


def worker_seed(epoch_seed: int, worker: int) -> int:
    """A loader worker's augmentation seed for an epoch: a function of the epoch and the worker only."""
    return int(np.random.SeedSequence([epoch_seed % 2**63, worker]).generate_state(1)[0])


class ImageDataset(Dataset):
    """Images named by ``paths`` (or given as HxW[xC] uint8 arrays) with optional per-row targets (dict of
    column -> array). Augmentations draw
    from a seed per epoch (``set_epoch``): in the main process at once, in each loader worker at its first
    item of the epoch, from (epoch seed, worker id), so persistent workers and a resumed run draw the same."""

    def __init__(self, paths: list[Path], in_chans: int, transform=None, targets: dict | None = None,
                 cache: bool = False, size: int | None = None):
        """``size``: decode JPEGs at no less than this many pixels a side (``decode_size``)."""
        self.paths = list(paths)
        self.in_chans, self.size = in_chans, size
        self.transform = transform
        self.targets = targets or {}
        self._cache: dict[int, np.ndarray] | None = {} if cache else None
        self._epoch, self._seeded = EpochSeed(), None  # (shared by views: with_transform copies the reference)

    def __len__(self) -> int:
        return len(self.paths)

    def with_transform(self, transform) -> ImageDataset:
        """The same images (and the same cache, shared, not copied) under another transform."""
        view = copy.copy(self)
        view.transform = transform
        return view

    def set_epoch(self, seed: int) -> None:
        """Reseed the augmentations so each epoch is reproducible (and a resumed run matches)."""
        self._epoch.set(seed)
        self._reseed(seed)

    def _reseed(self, seed: int) -> None:
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)

    def _worker_reseed(self) -> None:
        """In a loader worker, at the first item of each epoch: this worker's seed for the epoch."""
        info = torch.utils.data.get_worker_info()
        if info is not None and self._seeded != (epoch := self._epoch.get()):
            self._seeded = epoch
            self._reseed(worker_seed(epoch, info.id))

    def preload(self, threads: int = 4, desc: str = "decode images") -> None:
        """Fill the cache in this process before the loader forks its workers, so every worker shares it
        (a cache filled lazily inside a worker dies with that worker at the end of the epoch)."""
        if self._cache is None:
            return
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        todo = [i for i in range(len(self.paths)) if i not in self._cache]
        pool = ThreadPoolExecutor(max(1, threads))  # PIL decodes without holding the GIL
        try:  # np.array: each image owns its pixels (not a view of PIL's bytes), so the workers' reference
            # counting does not copy the pixel pages
            arrays = pool.map(lambda j: np.array(read_image(self.paths[j], self.in_chans, self.size)), todo)
            for i, arr in zip(todo, tqdm(arrays, total=len(todo), desc=desc, leave=False, disable=len(todo) < 1000)):
                self._cache[i] = arr
        finally:  # a bad file stops the decoding at once (the queued images are dropped)
            pool.shutdown(wait=True, cancel_futures=True)

    def image(self, i: int) -> np.ndarray:
        if isinstance(self.paths[i], np.ndarray):  # an image already in memory (the Predictor takes arrays)
            arr = self.paths[i]
            return arr[:, :, None] if arr.ndim == 2 else arr
        if self._cache is not None:
            if i not in self._cache:
                self._cache[i] = read_image(self.paths[i], self.in_chans, self.size)
            return self._cache[i]
        return read_image(self.paths[i], self.in_chans, self.size)

    def __getitem__(self, i: int):
        img = self.image(i)
        self._worker_reseed()
        if self.transform is not None:
            x = self.transform(image=img)["image"]
        else:
            x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float() / 255.0
        y = {k: torch.as_tensor(v[i]) for k, v in self.targets.items()}
        return x, y, i


def loader_workers(data_cfg: dict, device) -> int:
    """``data.num_workers`` resolved for the device (see the schema for what ``auto`` means)."""
    n = data_cfg["num_workers"]
    if n != "auto":
        return int(n)
    import os

    if getattr(device, "type", str(device)) == "cpu":
        return 0
    return max(0, min((os.cpu_count() or 1) - 1, 8))


CACHE_MEMORY_SHARE = 0.25  # data.cache=auto keeps decoded images when they take at most this share of free memory


def data_key(data_cfg: dict) -> dict:
    """The part of ``data`` that changes what a model learns, for stage keys. How images are read
    (``cache``, ``num_workers``) is left out; ``cache`` is pinned to its old default, so the keys of
    models trained before ``auto`` existed stay valid."""
    key = {**{k: v for k, v in dict(data_cfg).items() if k != "num_workers"}, "cache": False}
    if key.get("normalize") == "auto":  # (keys of models trained before data.normalize existed stay valid)
        key.pop("normalize")
    if key.get("jpeg_draft", True):  # (and before jpeg_draft: PNG competitions decode the same either way)
        key.pop("jpeg_draft", None)
    return key


def available_memory() -> int | None:
    """Bytes free for new allocations: Linux ``MemAvailable`` (else free pages), capped by the container's
    cgroup limit (Kaggle, Docker); None if unknown."""
    import os

    free = None
    try:
        with open("/proc/meminfo") as f:
            free = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit_file, used_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                   "/sys/fs/cgroup/memory/memory.usage_in_bytes")):  # v1
        try:
            limit, used = (Path(limit_file).read_text().strip(), Path(used_file).read_text().strip())
        except OSError:
            continue
        if limit.isdigit() and used.isdigit():
            free = min(free, max(0, int(limit) - int(used)))
        break
    return free


def decoded_bytes(paths: list, in_chans: int, sample: int = 32) -> int:
    """Estimated bytes of every image decoded as uint8 with ``in_chans`` channels: the mean size of up to
    ``sample`` evenly spaced files (read from their headers, not decoded), times the count."""
    from PIL import Image

    picks = sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(sample, len(paths)))})
    sizes = []
    for i in picks:
        try:
            with Image.open(paths[i]) as img:
                sizes.append(img.size[0] * img.size[1] * in_chans)
        except (OSError, ValueError):
            continue  # a missing or bad file is reported when it is read, by the stage itself
    return int(np.mean(sizes) * len(paths)) if sizes else 0


def parallel_jobs() -> int:
    """How many jobs ``make -jN`` may run at once, this one included (``make -j4 train`` trains four folds in
    four processes, each holding its own image cache): N, the CPU count for a bare ``-j``, 1 outside make."""
    import re

    m = re.search(r"(?:^|\s)-j(\d*)(?=\s|$)", os.environ.get("MAKEFLAGS", ""))
    if m is None:
        return 1
    return max(1, int(m.group(1))) if m.group(1) else os.cpu_count() or 1


def resolve_cache(data_cfg: dict, paths: list, copies: int = 1, workers: int = 0) -> tuple[bool, str]:
    """``data.cache`` resolved for these images: ``auto`` keeps them when the decoded pixels (estimated
    from a sample of file headers, times ``copies``, the processes that each hold one, times make's
    parallel jobs) take at most ``CACHE_MEMORY_SHARE`` of the free memory. With loader workers it needs
    the ``fork`` start method (the workers share the parent's cache; spawned ones would each get a pickled
    copy every epoch).
    Returns the decision and a line saying why."""
    import multiprocessing

    setting = data_cfg["cache"]
    if setting != "auto":
        return bool(setting), f"data.cache={str(bool(setting)).lower()}"
    if not paths:
        return False, "data.cache=auto: no images"
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if workers > 0 and method != "fork":
        return False, (f"data.cache=auto: loader workers start with '{method}', not fork, so each would copy "
                       "the cache -> read from disk each epoch")
    copies *= parallel_jobs()
    need = decoded_bytes(paths, data_cfg["in_chans"]) * copies
    free = available_memory()
    keep = free is not None and need <= CACHE_MEMORY_SHARE * free
    where = "unknown free memory" if free is None else f"{free / 2**30:.1f} GiB free"
    return keep, (f"data.cache=auto: {len(paths)} images x {copies} process(es) ~ {need / 2**20:.1f} MiB decoded, "
                  f"{where} -> {'kept in memory' if keep else 'read from disk each epoch'}")


class SharedImages:
    """One set of images read by several models in turn (the test set, by every fold model): decoded once
    when ``data.cache`` keeps them, decoded again only when a model wants another number of channels."""

    def __init__(self, paths: list, data_cfg: dict, workers: int = 0, desc: str = "decode images"):
        self.paths, self.data_cfg, self.workers, self.desc = list(paths), data_cfg, workers, desc
        self._images: ImageDataset | None = None

    def view(self, in_chans: int, transform, size: int | None = None) -> tuple[ImageDataset, str | None]:
        """The images under one model's transform (decoded at ``size``), and the cache decision when they were
        (re)read, else None."""
        why = None
        if self._images is None or (self._images.in_chans, self._images.size) != (in_chans, size):
            keep, why = resolve_cache({**self.data_cfg, "in_chans": in_chans}, self.paths, 1, self.workers)
            self._images = ImageDataset(self.paths, in_chans, cache=keep, size=size)
            if self.workers > 0:  # decoded here, before the loader's workers fork and share them
                self._images.preload(self.workers, desc=self.desc)
        return self._images.with_transform(transform), why


def decode_size(data_cfg: dict, augment: list | None = None) -> int | None:
    """The size JPEGs are decoded at for this data section (``data.jpeg_draft``), or None: full size. A
    checkpoint from before ``jpeg_draft`` existed decodes in full, as it was trained; so do training images
    under a crop augmentation (a crop of a draft-decoded image would be upscaled, losing detail)."""
    if not data_cfg.get("jpeg_draft", False):
        return None
    crops = [n for n in (a if isinstance(a, str) else next(iter(a)) for a in augment or []) if "Crop" in n]
    return None if crops else data_cfg["image_size"]


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's random state (the albumentations pipeline keeps its own: ``set_epoch``)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """Loader ``worker_init_fn``: each worker its own Python, NumPy and torch random state (the forked copies
    would otherwise share one and repeat each other's draws), from the loader's seeded generator. The
    augmentations reseed per epoch and worker themselves (``ImageDataset``; jigsaw items seed per row)."""
    seed_everything(torch.utils.data.get_worker_info().seed % 2**31)
