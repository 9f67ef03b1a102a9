"""A fold model's checkpoint (``best.pt``, ``snapshot_e*.pt``): the one module that knows its keys.

A checkpoint is enough to rebuild and run the model without the training config: the weights, the heads,
the ``model`` and ``data`` sections it was built with (image size, channels, normalisation), and where it
came from (fold, epoch, score, metric, the train key ``stage_key``, the folds file's hash). Every reader
gets a ``Checkpoint``; a Kaggle bundle keeps a slim copy (``slim``: no provenance beyond the key, weights
in half precision on request). Loading goes through ``io.load_checkpoint`` (``weights_only``: a file
that would run code is refused). ``last.pt`` (resume state) is ``training.resume``'s own format.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.errors import InputError
from pipeline.store.io import atomic_path, load_checkpoint
from pipeline.training.models import Head, Net, create_backbone, head_options

if TYPE_CHECKING:
    from pipeline.config.schema import Config

FORMAT = 1  # written as "format"; files without one are the same layout (written before it was recorded)
PROVENANCE = ("fold", "epoch", "score", "metric", "stage_key", "folds_hash")


@dataclass
class Checkpoint:
    weights: dict
    heads: list[Head]
    model_cfg: dict
    data_cfg: dict
    fold: object = None
    epoch: object = None
    score: float | None = None
    metric: str | None = None
    stage_key: str | None = None
    folds_hash: str | None = None
    path: Path | None = field(default=None, compare=False)

    @classmethod
    def of(cls, model: Net, cfg: Config, **provenance) -> Checkpoint:
        """The checkpoint of a trained network under ``cfg`` (provenance: fold, epoch, score, ...)."""
        return cls(model.state_dict(), list(model.head_specs), cfg.model.model_dump(), cfg.data.model_dump(), **provenance)

    @classmethod
    def read(cls, path: str | Path, mmap: bool = False) -> Checkpoint:
        path = Path(path)
        raw = load_checkpoint(path, mmap=mmap)
        if not isinstance(raw, dict) or not {"model", "heads", "model_cfg", "data_cfg"} <= set(raw):
            raise InputError(f"{path}: not a fold-model checkpoint (no weights, heads, model and data sections); "
                             "it was not written by `make train`")
        if raw.get("format", FORMAT) > FORMAT:
            raise InputError(f"{path}: checkpoint format {raw['format']} is newer than this pipeline reads "
                             f"({FORMAT}); upgrade the pipeline package")
        return cls(raw["model"], [Head(**h) for h in raw["heads"]], raw["model_cfg"], raw["data_cfg"],
                   **{k: raw.get(k) for k in PROVENANCE}, path=path)

    @staticmethod
    def describes_fold(path: str | Path) -> dict | None:
        """``{"fold", "folds_hash", "stage_key"}`` of a fold-model file, or None for any other weights file
        (a bare state dict, our jigsaw backbone): for readers that take either."""
        raw = load_checkpoint(path, mmap=True)
        if isinstance(raw, dict) and "fold" in raw and "folds_hash" in raw:
            return {k: raw.get(k) for k in ("fold", "folds_hash", "stage_key")}
        return None

    @staticmethod
    def weights_in(path: str | Path) -> dict:
        """The state dict inside a weights file: a checkpoint's weights, or the file itself."""
        raw = load_checkpoint(path)
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
            return raw["model"]
        return raw

    def to_dict(self, slim: bool = False, fp16: bool = False) -> dict:
        weights = self.weights
        if fp16:
            weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
        out = {"format": FORMAT, "model": weights, "heads": [asdict(h) for h in self.heads],
               "model_cfg": self.model_cfg, "data_cfg": self.data_cfg}
        keep = ("fold", "epoch", "score", "metric", "stage_key") if slim else PROVENANCE
        return out | {k: getattr(self, k) for k in keep}

    def write(self, path: str | Path, slim: bool = False, fp16: bool = False) -> None:
        """Atomically; ``slim`` (a bundle's copy) drops the folds hash, ``fp16`` halves the float weights."""
        with atomic_path(Path(path)) as tmp:
            torch.save(self.to_dict(slim, fp16), tmp)

    def build(self, device: str = "cpu") -> Net:
        """The network, in eval mode on ``device``, with these weights."""
        m, d = self.model_cfg, self.data_cfg
        net = Net(create_backbone(m["backbone"], d["in_chans"], d.get("image_size")), self.heads, m["pool"],
                  m["bnneck"], 0.0, *head_options(m))
        net.load_state_dict(self.weights)
        return net.to(device).eval()

    def backbone_weights(self) -> dict:
        return {k[len("backbone."):]: v for k, v in self.weights.items() if k.startswith("backbone.")}

    def require_fold(self, fold) -> None:
        """Refuse a checkpoint that says it is another fold's model (a mixed-up models folder)."""
        if str(self.fold) != str(fold):
            raise InputError(f"{self.path} says it is fold {self.fold}'s model, not fold {fold}'s: the models folder "
                             "is mixed up, and another fold's model trained on this fold's validation rows")


def load_model(path: str | Path, device: str = "cpu") -> tuple[Net, Checkpoint]:
    """Rebuild a network from a fold checkpoint written by ``train`` (no config needed)."""
    ck = Checkpoint.read(path)
    return ck.build(device), ck
