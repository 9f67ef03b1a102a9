"""Networks: a timm backbone (from scratch or a local weights file), a pooling, and one head per target.

Nothing is downloaded: ``pretrained=False`` always; the starting weights are ``training.build``'s, and a
trained model's file is ``training.checkpoint``'s.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.competition.tables import label_columns
from pipeline.errors import ConfigError, InputError
from pipeline.registry import Registry
from pipeline.store.io import log
from pipeline.store.paths import main_head, targets
from pipeline.tasks import get_task, head_kind, head_kind_for
from pipeline.training.pretrained import create as local_weights

if TYPE_CHECKING:
    from pipeline.config.schema import Config


@dataclass
class Head:
    """One output of the network: ``kind`` is multiclass, binary, regression, vector, multilabel or position
    (jigsaw)."""

    name: str
    columns: list[str]
    kind: str
    out: int
    weight: float = 1.0


def heads_for(cfg: Config, train=None) -> list[Head]:
    """Main target head(s) from ``competition.target`` and auxiliary heads from ``competition.aux_targets``.

    An auxiliary target is a column name (a regression head) or a mapping
    ``{name, columns, task, num_classes, weight}``; ``task: vector`` regresses several columns at once.
    """
    comp = cfg.competition
    weights = cfg.train.loss_weights or {}
    heads = []
    if get_task(comp.task).label_sets:  # one head over every label (its columns, in label order)
        name = main_head(cfg)
        heads.append(_head(name, label_columns(cfg), comp.task, None, train, weights.get(name, 1.0), cfg))
    for col in [] if heads else targets(cfg):
        heads.append(_head(col, [col], comp.task, comp.num_classes, train, weights.get(col, 1.0), cfg))
    for aux in comp.aux_targets:
        if isinstance(aux, str):
            aux = {"name": aux, "columns": [aux], "task": "regression"}
        name = aux.get("name") or aux["columns"][0]
        cols = aux.get("columns") or [name]
        heads.append(_head(name, cols, aux.get("task", "regression"), aux.get("num_classes"), train,
                           weights.get(name, aux.get("weight", 1.0)), cfg))
    return heads


def _head(name, cols, task, n_classes, train, weight, cfg) -> Head:
    try:
        kind = head_kind_for(task, f"head '{name}'")
    except ConfigError as exc:
        raise InputError(str(exc)) from None
    if kind.outputs == "classes" and n_classes is None:
        if train is None:
            raise InputError(f"head '{name}': set competition.num_classes (no train table to infer it from).")
        n_classes = int(train[cols[0]].max()) + 1
    return Head(name, cols, kind.name, kind.n_outputs(n_classes, cols), float(weight))


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent p (p=1: average, p->inf: max)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p).flatten(1)


@dataclass(frozen=True)
class PoolKind:
    """A ``model.pool``: how a feature map (N, C, H, W) becomes a vector, how many C it yields, and its
    learnable part (a module kept as ``pool.<name>``, e.g. GeM's exponent ``pool.gem.p``), if any."""
    apply: Callable  # (learned module or None, feature map) -> (N, factor * C)
    factor: int = 1
    learned: Callable | None = None


def _avg(x):
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


POOLS = Registry("model.pool")
POOLS.register("avg")(PoolKind(lambda _, x: _avg(x)))
POOLS.register("gem")(PoolKind(lambda gem, x: gem(x), learned=GeM))
POOLS.register("avgmax")(PoolKind(lambda _, x: torch.cat([_avg(x), F.adaptive_max_pool2d(x, 1).flatten(1)], 1), 2))


class Pool(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.spec = kind, POOLS[kind]
        if self.spec.learned is not None:
            self.add_module(kind, self.spec.learned())  # its parameters are named after the pool (pool.gem.p)

    def forward(self, x):
        if x.ndim == 3:  # token sequences (transformers): mean over tokens
            return x.mean(1)
        return self.spec.apply(getattr(self, self.kind) if self.spec.learned else None, x)

    def factor(self) -> int:
        return self.spec.factor


def head_options(model_cfg: dict) -> tuple[str, float, int]:
    """(head, head_scale, head_subcenters) of a model section (a checkpoint's from before they existed: linear)."""
    return model_cfg.get("head", "linear"), model_cfg.get("head_scale", 30.0), model_cfg.get("head_subcenters", 1)


class CosineHead(nn.Module):
    """Class centres on the unit sphere (``subcenters`` per class; the closest one counts): the output is
    ``scale * cos(embedding, centre)``, a softmax's logits. In training the true class's cosine gets an
    angular margin first (``losses.Margin``), which pulls each class together and pushes classes apart."""

    def __init__(self, dim: int, out: int, scale: float, subcenters: int = 1):
        super().__init__()
        self.out, self.scale, self.subcenters = out, float(scale), int(subcenters)
        self.weight = nn.Parameter(torch.empty(out * self.subcenters, dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, z):
        with torch.autocast(z.device.type, enabled=False):  # in float32 under AMP: the margin needs full cosines
            cos = F.normalize(z.float(), dim=-1) @ F.normalize(self.weight.float(), dim=-1).t()
        if self.subcenters > 1:
            cos = cos.reshape(len(z), self.out, self.subcenters).amax(-1)
        return cos * self.scale


class Net(nn.Module):
    """backbone -> pool -> [BNNeck] -> dropout -> {head name: output}. ``head``: linear, or ``arcface`` /
    ``cosface``: a ``CosineHead`` for every head kind that takes a margin (the margin is the loss's)."""

    def __init__(self, backbone: nn.Module, heads: list[Head], pool: str = "avg", bnneck: bool = False,
                 dropout: float = 0.0, head: str = "linear", head_scale: float = 30.0, head_subcenters: int = 1):
        super().__init__()
        self.backbone = backbone
        self.pool = Pool(pool)
        dim = backbone.num_features * self.pool.factor()
        self.neck = nn.BatchNorm1d(dim) if bnneck else nn.Identity()
        if bnneck:
            self.neck.bias.requires_grad_(False)
        self.drop = nn.Dropout(dropout)
        cosine = head != "linear"
        self.heads = nn.ModuleDict({h.name: CosineHead(dim, h.out, head_scale, head_subcenters)
                                    if cosine and head_kind(h.kind).margin else nn.Linear(dim, h.out) for h in heads})
        self.head_specs = heads
        self.embed_dim = dim

    def embed(self, x):
        return self.neck(self.pool(self.backbone.forward_features(x)))

    def forward(self, x):
        z = self.drop(self.embed(x))
        return {name: head(z) for name, head in self.heads.items()}


def create_backbone(name: str, in_chans: int, image_size: int | None = None, pretrained: str | None = None) -> nn.Module:
    """A timm backbone without its classifier or pooling, from scratch or from the local weights
    ``pretrained`` names (``training.pretrained``). Models built for one input size (ViT, Swin, ...) are built
    for ``image_size`` (timm's ``img_size``); the others take any size and ignore it."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise InputError(f"model.backbone: unknown timm model '{name}'"
                         + (f"; close names: {', '.join(close)}." if close else "; see timm.list_models()."))
    def make(**extra):
        headless = dict(num_classes=0, global_pool="", **extra)
        if pretrained:
            return local_weights(name, in_chans, pretrained, **headless)
        return timm.create_model(name, pretrained=False, in_chans=in_chans, **headless)

    if image_size:
        try:
            return make(img_size=image_size)
        except TypeError as exc:  # a model with no fixed input size has no img_size argument
            if "img_size" not in str(exc):
                raise
        except (AssertionError, ValueError) as exc:  # e.g. a patch or window size that does not divide it
            raise InputError(f"model.backbone '{name}' cannot be built for data.image_size={image_size} ({exc}); "
                             "pick a size it divides (e.g. a multiple of its patch size)") from None
    return make()


def stage_groups(backbone: nn.Module) -> list[list[str]]:
    """The backbone's parameter names in timm's own coarse layer groups (``group_matcher(coarse=True)``):
    the stem first, then one group per stage (per block for a ViT), in order from the input."""
    from timm.models import group_parameters

    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        raise InputError(f"model.freeze_stages: {type(backbone).__name__} does not describe its stages "
                         "(no timm group_matcher); train it whole (model.freeze_stages=0)")
    groups = group_parameters(backbone, matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def freeze_stages(backbone: nn.Module, n: int) -> set[str]:
    """Freeze the stem and the first ``n`` stages, by timm's grouping of this family; returns the frozen
    parameter names. The last group (the deepest stage, or a head norm) always trains."""
    if n <= 0:
        return set()
    groups = stage_groups(backbone)
    if n >= len(groups) - 1:
        raise InputError(f"model.freeze_stages={n} would freeze all of {type(backbone).__name__} (its stem and "
                         f"{len(groups) - 1} stage groups); use at most {len(groups) - 2}")
    frozen = {name for group in groups[:n + 1] for name in group}
    for name, p in backbone.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return frozen


def activate(head: Head, logits: torch.Tensor) -> torch.Tensor:
    """Head output as the competition sees it: probabilities for classification, values otherwise."""
    how, logits = head_kind(head.kind).activation, logits.float()
    if how == "softmax":
        return logits.softmax(-1)
    if how == "sigmoid":
        return logits.sigmoid().squeeze(-1)
    if how == "sigmoids":  # one probability per label
        return logits.sigmoid()
    if how == "value":
        return logits.squeeze(-1)
    if how == "grid_softmax":  # one softmax over positions per tile
        n = int(round(head.out ** 0.5))
        return logits.reshape(len(logits), n, n).softmax(-1).reshape(len(logits), -1)
    return logits


_CUDA_OK: dict = {}


def cuda_works() -> bool:
    """Whether this torch can run a kernel on the GPU: ``is_available()`` is true on a GPU the build has no
    kernels for (a P100 under a cu128 torch), where the first real op fails. Probed once per process."""
    if "ok" not in _CUDA_OK:
        try:
            x = torch.ones(8, device="cuda")
            torch.nn.functional.conv2d(x.view(1, 2, 2, 2), torch.ones(1, 2, 1, 1, device="cuda")).sum().item()
            _CUDA_OK["ok"] = True
        except Exception as exc:  # noqa: BLE001 (any failure of the probe means: do not use this GPU)
            try:
                name = torch.cuda.get_device_name(0)
            except Exception:  # noqa: BLE001
                name = "the GPU"
            log(f"[device] {name} is visible but this torch {torch.__version__} cannot run on it "
                f"({str(exc).splitlines()[0][:120]}); using the CPU")
            _CUDA_OK["ok"] = False
    return _CUDA_OK["ok"]


def pick_device(choice: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU (or the device named in the config)."""
    if choice != "auto":
        return torch.device(choice)
    if torch.cuda.is_available() and cuda_works():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
