"""Networks: a timm backbone (from scratch or a local weights file), a pooling, and one head per target.

Nothing is downloaded: ``pretrained=False`` always; ``model.init`` names a local file (our jigsaw
pretraining or the user's own) whose matching keys are loaded and reported.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError
from .paths import targets
from .io import load_checkpoint, log


@dataclass
class Head:
    """One output of the network: ``kind`` is multiclass, binary, regression, vector or position (jigsaw)."""

    name: str
    columns: list[str]
    kind: str
    out: int
    weight: float = 1.0


def heads_for(cfg: dict, train=None) -> list[Head]:
    """Main target head(s) from ``competition.target`` and auxiliary heads from ``competition.aux_targets``.

    An auxiliary target is a column name (a regression head) or a mapping
    ``{name, columns, task, num_classes, weight}``; ``task: vector`` regresses several columns at once.
    """
    comp = cfg["competition"]
    weights = cfg["train"]["loss_weights"] or {}
    heads = []
    for col in targets(cfg):
        heads.append(_head(col, [col], comp["task"], comp["num_classes"], train, weights.get(col, 1.0), cfg))
    for aux in comp["aux_targets"]:
        if isinstance(aux, str):
            aux = {"name": aux, "columns": [aux], "task": "regression"}
        name = aux.get("name") or aux["columns"][0]
        cols = aux.get("columns") or [name]
        heads.append(_head(name, cols, aux.get("task", "regression"), aux.get("num_classes"), train,
                           weights.get(name, aux.get("weight", 1.0)), cfg))
    return heads


def _head(name, cols, task, n_classes, train, weight, cfg) -> Head:
    if task == "multiclass":
        if n_classes is None:
            if train is None:
                raise InputError(f"head '{name}': set competition.num_classes (no train table to infer it from).")
            n_classes = int(train[cols[0]].max()) + 1
        return Head(name, cols, "multiclass", int(n_classes), float(weight))
    if task == "binary":
        return Head(name, cols, "binary", 1, float(weight))
    if task in ("regression", "ordinal"):
        return Head(name, cols, "regression", 1, float(weight))
    if task == "vector":
        return Head(name, cols, "vector", len(cols), float(weight))
    raise InputError(f"head '{name}': unknown task '{task}' (multiclass, binary, regression, ordinal, vector).")


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent p (p=1: average, p->inf: max)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p).flatten(1)


class Pool(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        if kind not in ("avg", "gem", "avgmax"):
            raise InputError(f"model.pool must be avg, gem or avgmax, got '{kind}'.")
        self.kind = kind
        self.gem = GeM() if kind == "gem" else None

    def forward(self, x):
        if x.ndim == 3:  # token sequences (transformers): mean over tokens
            return x.mean(1)
        if self.kind == "gem":
            return self.gem(x)
        avg = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.kind == "avgmax":
            return torch.cat([avg, F.adaptive_max_pool2d(x, 1).flatten(1)], 1)
        return avg

    def factor(self) -> int:
        return 2 if self.kind == "avgmax" else 1


class Net(nn.Module):
    """backbone -> pool -> [BNNeck] -> dropout -> {head name: output}."""

    def __init__(self, backbone: nn.Module, heads: list[Head], pool: str = "avg", bnneck: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.pool = Pool(pool)
        dim = backbone.num_features * self.pool.factor()
        self.neck = nn.BatchNorm1d(dim) if bnneck else nn.Identity()
        if bnneck:
            self.neck.bias.requires_grad_(False)
        self.drop = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({h.name: nn.Linear(dim, h.out) for h in heads})
        self.head_specs = heads
        self.embed_dim = dim

    def embed(self, x):
        return self.neck(self.pool(self.backbone.forward_features(x)))

    def forward(self, x):
        z = self.drop(self.embed(x))
        return {name: head(z) for name, head in self.heads.items()}


def create_backbone(name: str, in_chans: int, image_size: int | None = None) -> nn.Module:
    """A timm backbone without its classifier or pooling. Models built for one input size (ViT, Swin, ...)
    are built for ``image_size`` (timm's ``img_size``); the others take any size and ignore it."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise InputError(f"model.backbone: unknown timm model '{name}'"
                         + (f"; close names: {', '.join(close)}." if close else "; see timm.list_models()."))
    kwargs = dict(pretrained=False, num_classes=0, global_pool="", in_chans=in_chans)
    if image_size:
        try:
            return timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError as exc:  # a model with no fixed input size has no img_size argument
            if "img_size" not in str(exc):
                raise
        except (AssertionError, ValueError) as exc:  # e.g. a patch or window size that does not divide it
            raise InputError(f"model.backbone '{name}' cannot be built for data.image_size={image_size} ({exc}); "
                             "pick a size it divides (e.g. a multiple of its patch size)") from None
    return timm.create_model(name, **kwargs)


def init_path(cfg: dict, fold=None) -> str | None:
    """``model.init`` for one fold: ``{fold}`` in the path becomes the fold (0, 1, ..., full), so each fold can
    start from its own fold's checkpoint of an earlier experiment."""
    init = cfg["model"]["init"]
    return init.format(fold=fold) if init else init  # (the schema allows no other placeholder)


def init_leak(cfg: dict, folds, folds_hash: str) -> str | None:
    """A LEAKY mark when a fold starts from a fold checkpoint that trained on its validation rows: another
    fold's model, the all-data model, or a model of another folds file. Label-free weights (jigsaw) and each
    fold's own checkpoint of the same folds are clean."""
    if not cfg["model"]["init"]:
        return None
    bad = []
    for k in folds:
        path = Path(init_path(cfg, k))
        if not path.exists() or k == "full":
            continue
        ck = load_checkpoint(path, mmap=True)
        if not isinstance(ck, dict) or "fold" not in ck or "folds_hash" not in ck:
            continue  # not a fold model (a backbone state dict, our jigsaw weights)
        if str(ck["fold"]) != str(k) or ck["folds_hash"] != folds_hash:
            bad.append(f"fold {k} <- {path} (fold {ck['fold']}" + (", other folds" if ck["folds_hash"] != folds_hash
                                                                  else "") + ")")
    if not bad:
        return None
    return (f"LEAKY: model.init starts fold(s) from a model that trained on their validation rows ({'; '.join(bad[:3])}); "
            "its CV is optimistic: use model.init=.../fold{fold}/best.pt with the same folds")


def build_model(cfg: dict, heads: list[Head], fold=None) -> Net:
    m = cfg["model"]
    net = Net(create_backbone(m["backbone"], cfg["data"]["in_chans"], cfg["data"]["image_size"]), heads, m["pool"],
              m["bnneck"], m["dropout"])
    if m["init"]:
        report = load_backbone_weights(net.backbone, init_path(cfg, fold))
        print(f"[model] {report}", flush=True)
    return net


@dataclass
class LoadReport:
    path: str
    matched: int
    total: int
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    def __str__(self) -> str:
        s = f"loaded {self.matched}/{self.total} backbone tensors from {self.path}"
        if self.missing:
            s += f"; missing {len(self.missing)} (e.g. {', '.join(self.missing[:3])})"
        if self.unexpected:
            s += f"; ignored {len(self.unexpected)} unexpected (e.g. {', '.join(self.unexpected[:3])})"
        if self.mismatched:
            s += f"; shape mismatch {len(self.mismatched)} (e.g. {', '.join(self.mismatched[:3])})"
        return s


def load_backbone_weights(backbone: nn.Module, path: str | Path, strict_min: float = 0.5) -> LoadReport:
    """Load a local state dict into ``backbone``; prefixes ``module.``/``backbone.`` are stripped.
    Refuses (naming the keys) when fewer than ``strict_min`` of the backbone's tensors match."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"model.init: weights file {path} does not exist (no download is ever attempted); "
                         "run `make pretrain` or name a local file.")
    state = load_checkpoint(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    clean = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        clean[k] = v
    own = backbone.state_dict()
    matched = {k: v for k, v in clean.items() if k in own and own[k].shape == v.shape}
    mismatched = [k for k, v in clean.items() if k in own and own[k].shape != v.shape]
    report = LoadReport(str(path), len(matched), len(own), sorted(set(own) - set(matched)),
                        sorted(k for k in clean if k not in own), mismatched)
    if len(matched) < strict_min * len(own):
        raise InputError(f"model.init: {path} does not fit backbone {type(backbone).__name__}: {report}. "
                         "Was it saved from another model.backbone or in_chans?")
    backbone.load_state_dict(matched, strict=False)
    return report


def save_checkpoint_model(model: Net, cfg: dict, extra: dict) -> dict:
    """What a fold checkpoint holds to rebuild the model without the training config (inference API)."""
    return {"model": model.state_dict(), "heads": [asdict(h) for h in model.head_specs],
            "model_cfg": cfg["model"], "data_cfg": cfg["data"], **extra}


def load_model(path: str | Path, device: str = "cpu") -> tuple[Net, dict]:
    """Rebuild a network from a fold checkpoint written by ``train`` (no config needed)."""
    ckpt = load_checkpoint(path)
    heads = [Head(**h) for h in ckpt["heads"]]
    m = ckpt["model_cfg"]
    d = ckpt["data_cfg"]
    net = Net(create_backbone(m["backbone"], d["in_chans"], d.get("image_size")), heads, m["pool"], m["bnneck"], 0.0)
    net.load_state_dict(ckpt["model"])
    return net.to(device).eval(), ckpt


def freeze_stages(backbone: nn.Module, n: int) -> list[str]:
    """Freeze the stem and the first ``n`` stages (timm ``feature_info``); returns frozen module names."""
    if n <= 0:
        return []
    stage_names = [f["module"].split(".")[0] for f in getattr(backbone, "feature_info", [])]
    if not stage_names:
        raise InputError("model.freeze_stages: this backbone does not describe its stages (no feature_info).")
    # the first feature_info entry is usually the stem's output; count stages after it
    last = stage_names[min(n, len(stage_names) - 1)]
    frozen = []
    for name, child in backbone.named_children():
        for p in child.parameters():
            p.requires_grad_(False)
        frozen.append(name)
        if name == last:
            break
    return frozen


def activate(head: Head, logits: torch.Tensor) -> torch.Tensor:
    """Head output as the competition sees it: probabilities for classification, values otherwise."""
    if head.kind == "multiclass":
        return logits.float().softmax(-1)
    if head.kind == "binary":
        return logits.float().sigmoid().squeeze(-1)
    if head.kind == "regression":
        return logits.float().squeeze(-1)
    if head.kind == "position":
        n = int(round(head.out ** 0.5))
        return logits.float().reshape(len(logits), n, n).softmax(-1).reshape(len(logits), -1)
    return logits.float()


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
