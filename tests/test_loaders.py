"""The fold loop's loaders: with workers they persist between epochs, and an epoch's draws (shuffle and
augmentations) depend on its seed alone, so a resumed run (fresh loaders at epoch e) draws what a run
that went through epochs 0..e with the same persistent workers drew."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.competition.images import ImageDataset, build_transform
from pipeline.training.loaders import Loaders

NO_DDP = SimpleNamespace(enabled=False, rank=0, world=1)
AUGMENT = [{"Affine": {"translate_percent": [-0.2, 0.2], "rotate": [-30, 30], "p": 1.0}}, "HorizontalFlip"]


def images(folder, same: bool = False):
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    paths, pixels = [], rng.integers(0, 255, (16, 16), dtype=np.uint8)
    for i in range(24):
        paths.append(folder / f"{i}.png")
        Image.fromarray(pixels if same else rng.integers(0, 255, (16, 16), dtype=np.uint8), mode="L").save(paths[-1])
    data = {"in_chans": 1, "image_size": 16, "normalize": "none", "mean": None, "std": None}
    return lambda: ImageDataset(paths, 1, build_transform(data, AUGMENT, seed=0), cache=True, size=16)


@pytest.fixture
def dataset(tmp_path):
    return images(tmp_path / "images")


def epoch(loaders, ds, seed):
    ds.set_epoch(seed)  # as FoldTrainer.train_epoch does
    batches = [(x, i) for x, _, i in loaders.get(ds, True, seed)]
    return torch.cat([x for x, _ in batches]), torch.cat([i for _, i in batches])


def test_workers_persist_between_epochs_and_each_epoch_draws_from_its_seed_alone(dataset):
    ds = dataset()
    loaders = Loaders(batch_size=4, workers=2, pin_memory=False, dist=NO_DDP)
    x0, i0 = epoch(loaders, ds, 100)
    first = loaders.get(ds, True, 100)
    pids = [w.pid for w in first._iterator._workers]
    x1, i1 = epoch(loaders, ds, 101)
    assert loaders.get(ds, True, 101) is first and [w.pid for w in first._iterator._workers] == pids  # not re-forked
    assert not torch.equal(i0, i1)  # another shuffle
    order = torch.argsort(i0), torch.argsort(i1)
    assert not torch.allclose(x0[order[0]], x1[order[1]])  # other augmentations of the same images
    # a resumed run: new dataset copy and new loaders, straight at epoch 101
    fresh = Loaders(batch_size=4, workers=2, pin_memory=False, dist=NO_DDP)
    x1b, i1b = epoch(fresh, dataset(), 101)
    assert torch.equal(i1, i1b) and torch.equal(x1, x1b)
    loaders.close()
    fresh.close()


def test_persistent_workers_draw_new_augmentations_each_epoch(tmp_path):
    """All images the same: only the draws tell the epochs apart (a worker replaying its first epoch's
    draws on other images would pass the test above)."""
    ds = images(tmp_path / "same", same=True)()
    loaders = Loaders(batch_size=4, workers=2, pin_memory=False, dist=NO_DDP)
    (x0, _), (x1, _) = epoch(loaders, ds, 100), epoch(loaders, ds, 101)
    assert not torch.allclose(x0, x1)
    loaders.close()


def test_without_workers_the_loader_is_made_per_epoch_with_the_draws_it_always_had(dataset):
    from torch.utils.data import DataLoader

    ds = dataset()
    loaders = Loaders(batch_size=4, workers=0, pin_memory=False, dist=NO_DDP)
    a = loaders.get(ds, True, 7)
    assert loaders.get(ds, True, 7) is not a and not a.persistent_workers
    _, got = epoch(loaders, ds, 7)
    # the loader the trainer made before loaders persisted (the CPU runs draw as they did)
    before = DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7), num_workers=0)
    assert torch.equal(got, torch.cat([i for _, _, i in before]))
