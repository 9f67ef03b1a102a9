"""Pretrained timm weights from a local file or folder (``model.pretrained``), never a download.

Kaggle code competitions run offline: the weights come attached as a Kaggle dataset or model. Accepted:

- a weights file: ``.safetensors``, ``.pth``, ``.bin``, ``.pt`` (a timm state dict of ``model.backbone``);
- timm's Hub layout: a folder with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``),
  as ``timm.models.save_for_hf`` writes it and as Kaggle Models mount it;
- a Hugging Face cache folder ``models--timm--<name>`` (its ``snapshots/<revision>/`` folder);
- a folder that holds exactly one of these, at any depth (``/kaggle/input/<model>/pytorch/default/1``).

The weights go through timm's own pretrained machinery (``pretrained_cfg_overlay=dict(file=...)`` or
``local-dir:``), so timm adapts ``in_chans`` (a 1-channel stem sums the RGB filters), drops the classifier
and reads the folder's ``pretrained_cfg`` (mean, std, input size), which ``data.normalize: model`` uses.
``HF_HUB_OFFLINE`` is set before timm is asked, so nothing is ever fetched.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import InputError

SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class LocalWeights:
    given: Path
    file: Path  # the weights file itself
    folder: Path | None = None  # a Hub-layout folder (config.json beside the file)
    config: dict = field(default_factory=dict)  # its config.json: architecture, pretrained_cfg


def _hub_folder(folder: Path, given: Path) -> LocalWeights:
    weights = next((folder / f for f in HUB_FILES if (folder / f).exists()), None)
    if weights is None:
        raise InputError(f"model.pretrained: {folder} has a config.json but no {' or '.join(HUB_FILES)}; copy the "
                         "weights file beside it")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"model.pretrained: {folder / 'config.json'} is not readable JSON ({exc})") from None
    return LocalWeights(given, weights, folder, config)


def locate(path: str | Path) -> LocalWeights:
    """What ``model.pretrained`` names, or an error naming the file or folder and what is missing."""
    given = Path(path)
    if not given.exists():
        raise InputError(f"model.pretrained: {given} does not exist (no download is ever attempted); attach the "
                         "weights (a Kaggle dataset or model) and name the file or its folder")
    if given.is_file():
        if given.suffix not in SUFFIXES:
            raise InputError(f"model.pretrained: {given} is not a weights file ({', '.join(SUFFIXES)})")
        return LocalWeights(given, given)
    if (given / "snapshots").is_dir():  # a Hugging Face cache folder: refs/main names the revision
        ref = given / "refs" / "main"
        snaps = sorted((given / "snapshots").iterdir())
        snap = given / "snapshots" / ref.read_text().strip() if ref.exists() else (snaps[-1] if snaps else None)
        if snap is None or not snap.is_dir():
            raise InputError(f"model.pretrained: {given} is a Hugging Face cache folder without a snapshot")
        return locate(snap)
    if (given / "config.json").exists():
        return _hub_folder(given, given)
    configs = sorted(given.rglob("config.json"))
    if len(configs) == 1:
        return _hub_folder(configs[0].parent, given)
    files = sorted(p for p in given.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    if len(files) == 1 and not configs:
        return LocalWeights(given, files[0])
    found = [str(p.relative_to(given)) for p in [*configs, *files]][:5]
    raise InputError(f"model.pretrained: {given} holds {'no weights file' if not found else 'several candidates'} "
                     f"({', '.join(found) or 'nothing with ' + '/'.join(SUFFIXES)}); name the file or folder itself")


def pretrained_cfg(path: str | Path | None, backbone: str) -> dict:
    """The normalisation and input size the weights were trained with: the folder's ``pretrained_cfg``, else
    timm's default for ``backbone`` (what a bare weights file of that model was trained with)."""
    if path:
        cfg = locate(path).config.get("pretrained_cfg")
        if cfg:
            return cfg
    from timm.models import get_pretrained_cfg

    default = get_pretrained_cfg(backbone)
    if default is None:
        raise InputError(f"data.normalize=model: timm knows no pretrained config for '{backbone}'; set "
                         "data.normalize=imagenet, or data.normalize=dataset with data.mean/data.std")
    return default.to_dict()


def create(name: str, in_chans: int, path: str | Path, **kwargs):
    """``timm.create_model(name, pretrained=True)`` from the local weights at ``path`` (see the module)."""
    import timm

    weights = locate(path)
    arch = weights.config.get("architecture")
    if arch and arch != name:
        raise InputError(f"model.pretrained: {weights.folder} holds a '{arch}' (its config.json), but "
                         f"model.backbone is '{name}'; set model.backbone={arch} or name other weights")
    if weights.file.suffix != ".safetensors":  # a pickle: refused if it would run code, like every checkpoint
        from pipeline.store.io import load_checkpoint

        load_checkpoint(weights.file, mmap=True)
    os.environ["HF_HUB_OFFLINE"] = "1"  # timm never reaches the Hub, even for a name it would fetch
    args = dict(pretrained=True, in_chans=in_chans, **kwargs)
    try:
        if weights.folder is not None:
            return timm.create_model(f"local-dir:{weights.folder}", **args)
        # the file is the only source timm is given: no url, no Hub id to fall back to
        return timm.create_model(name, pretrained_cfg_overlay=dict(file=str(weights.file), url=None, hf_hub_id=None),
                                 **args)
    except RuntimeError as exc:  # tensors of another model or size
        first = str(exc).strip().splitlines()
        raise InputError(f"model.pretrained: {weights.file} does not fit model.backbone '{name}' "
                         f"({' '.join(first[:2])[:300]}); name the weights of this backbone") from None


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _channels(values, in_chans: int) -> list[float]:
    """RGB statistics for ``in_chans`` inputs, the way timm adapts the stem: 1 channel is their mean (the
    RGB filters are summed over a grey image), more channels repeat them."""
    values = [float(v) for v in values]
    if in_chans == len(values):
        return values
    if in_chans == 1:
        return [sum(values) / len(values)]
    return [values[i % len(values)] for i in range(in_chans)]


def with_normalization(cfg):
    """``cfg`` with ``data.mean``/``data.std`` resolved from ``data.normalize``: ``model`` (the weights'
    ``pretrained_cfg``; the default with ``model.pretrained``), ``imagenet``, ``none`` (pixels / 255) or
    ``dataset`` (``data.mean``/``data.std`` as given, 0.5 when unset; the default without pretrained
    weights). Training records the result in every checkpoint, so features, the Predictor and a Kaggle
    bundle preprocess exactly as training did."""
    data, model = cfg.data, cfg.model
    mode = data.normalize
    if mode == "auto":
        mode = "model" if model.pretrained else "dataset"
    if mode == "dataset":
        return cfg
    if mode == "model":
        pc = pretrained_cfg(model.pretrained, model.backbone)
        mean, std = pc["mean"], pc["std"]
    elif mode == "imagenet":
        mean, std = IMAGENET
    else:  # none
        mean, std = (0.0,) * 3, (1.0,) * 3
    c = data.in_chans
    # the resolved values, not a user's setting: data.mean/std beside data.normalize=model would be refused
    return cfg.model_copy(update={"data": data.model_copy(update={"mean": _channels(mean, c), "std": _channels(std, c)})})
