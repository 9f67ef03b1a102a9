"""The typed config refuses every bad value before any work, naming the key, the value and what is allowed."""
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.__main__ import main
from pipeline.config.loading import load_config
from pipeline.config.schema import DEFAULTS, METRIC_TASKS, Config
from pipeline.errors import ConfigError
from pipeline.level2 import models as level2
from pipeline.metrics import METRICS
from pipeline.predict import tta
from pipeline.tasks import TASKS
from pipeline.training import losses, optim
from pipeline.training.models import POOLS
from tests.conftest import CFG


def _enumerated(model=Config, prefix=""):
    """(dotted key, allowed values) of every field whose values are a fixed set: a Literal (also inside a
    list or a union) or a name checked against a registry."""
    registries = {"_optimizer": optim.OPTIMIZERS, "_scheduler": optim.SCHEDULERS, "_tta_set": tta.TTA_SETS,
                  "_level2": level2.LEVEL2_MODELS, "check_task_name": TASKS,
                  "_metric": METRICS, "_pool": POOLS}
    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _enumerated(ann, key + ".")
            continue
        for meta in field.metadata:
            fn = getattr(getattr(meta, "func", None), "__name__", "")
            if fn in registries:
                out.append((key, list(registries[fn])))
        stack = [ann]
        while stack:
            t = stack.pop()
            if typing.get_origin(t) is typing.Literal:
                out.append((key, list(typing.get_args(t))))
            else:
                stack += list(typing.get_args(t))
    return out


ENUMERATED = _enumerated()


def test_every_enumerated_key_is_found():
    keys = {k for k, _ in ENUMERATED}
    assert {"competition.task", "competition.metric", "folds.method", "model.pool", "train.optimizer",
            "train.scheduler", "train.class_weights", "pretrain.formulation", "pretrain.optimizer",
            "pretrain.scheduler", "features.tta", "features.stats", "stack.model", "stack.test_mode"} <= keys


@pytest.mark.parametrize("key,allowed", ENUMERATED, ids=[k for k, _ in ENUMERATED])
def test_enumerated_value_refused_with_key_value_and_allowed(key, allowed):
    value = "[bogus]" if isinstance(DEFAULTS[key.split(".")[0]].get(key.split(".")[1]) if "." in key else None,
                                    list) else "bogus"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={value}"])
    msg = str(err.value)
    assert key in msg and "bogus" in msg, msg
    for v in allowed:
        assert str(v) in msg, (v, msg)


@pytest.mark.parametrize("task", ["multiclass", "binary", "regression", "ordinal"])
def test_loss_must_suit_the_head_of_the_task(task):
    kind = {"ordinal": "regression"}.get(task, task)
    metric = next(m for m, tasks in METRIC_TASKS.items() if task in tasks)
    for name in losses.LOSSES[kind]:
        load_config(None, [f"competition.task={task}", f"competition.metric={metric}", f"train.loss={name}"])
    wrong = {"multiclass": "mae", "binary": "ce", "regression": "ce"}[kind]
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"competition.task={task}", f"competition.metric={metric}", f"train.loss={wrong}"])
    msg = str(err.value)
    assert f"train.loss '{wrong}'" in msg and f"{kind} head" in msg
    assert all(n in msg for n in losses.LOSSES[kind])


def test_metric_must_suit_the_task():
    with pytest.raises(ConfigError, match="competition.metric 'rmse' does not apply to task 'multiclass'.*accuracy"):
        load_config(None, ["competition.metric=rmse"])
    load_config(None, ["competition.metric=rmse", "competition.task=regression"])


@pytest.mark.parametrize("override,fragment", [
    ("train.lr=-1", "train.lr = -1: Input should be greater than 0"),
    ("train.lr=0", "train.lr = 0"),
    ("train.batch_size=0", "train.batch_size = 0: Input should be greater than or equal to 1"),
    ("train.epochs=abc", "train.epochs = 'abc': Input should be a valid integer"),
    ("train.epochs=0", "train.epochs = 0"),
    ("folds.n_splits=1", "folds.n_splits = 1: Input should be greater than or equal to 2"),
    ("train.ema_decay=1.5", "train.ema_decay = 1.5: Input should be less than 1"),
    ("train.mix_prob=2", "train.mix_prob = 2"),
    ("train.ohem=0", "train.ohem = 0"),
    ("features.scales=[0, 1]", "features.scales"),
    ("postprocess.clip=[3, 1]", "lo <= hi"),
    ("postprocess.force_from={head: x}", "force_from needs 'experiment'"),
    ("train.multiscale=[4]", ">= 8 pixels"),
    ("data.num_workers=-1", "data.num_workers = -1"),
    ("competition.num_classes=1", "competition.num_classes = 1"),
])
def test_range_and_type_refusals(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_dead_keys_are_gone_and_all_errors_are_listed_at_once():
    for dead in ("train.deterministic=true", "train.log_every=5"):
        with pytest.raises(ConfigError, match="unknown config key"):
            load_config(None, [dead])
    with pytest.raises(ConfigError, match="invalid config values: .*train.epochs.*train.lr"):
        load_config(None, ["train.lr=0", "train.epochs=0"])


def test_values_are_coerced_to_their_types():
    cfg = load_config(None, ["train.epochs='3'", "train.lr=1e-3"])
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["lr"] == pytest.approx(1e-3)


def test_cli_refuses_before_any_work(tmp_path, capsys):
    # a typo in stack.model stops at once: no folds, features or leaderboard are touched
    assert main(["stack", *CFG, "stack.model=lgb", f"competition.root={tmp_path}/none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "stack.model = 'lgb'" in err and "lgbm, linear, weighted" in err
    assert "Traceback" not in err and not any(tmp_path.iterdir())


def test_a_registered_loss_is_accepted_and_used():
    """README 'Extending the pipeline': one function + one register line makes a new train.loss work."""
    import torch

    from pipeline.training.models import Head

    @losses.LOSSES["multiclass"].register("poly1")
    def poly1(logits, y, head, opts, cw=None):
        ce = losses.cross_entropy(logits, y, head, opts, cw)
        pt = (losses._soft(logits, y, head, opts) * logits.float().softmax(-1)).sum(-1)
        return ce + (1 - pt)

    try:
        cfg = load_config(None, ["train.loss=poly1"])
        h = Head("t", ["t"], "multiclass", 3)
        logits, y = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])
        crit = losses.Criterion([h], cfg["train"], {"t"})
        ce = losses.cross_entropy(logits, y, h, {"label_smoothing": 0.0})
        assert float(crit({"t": logits}, {"t": y})) == pytest.approx(float(ce + 1 - logits.softmax(-1)[0, 0]))
    finally:
        losses.LOSSES["multiclass"]._items.pop("poly1")
    with pytest.raises(ConfigError, match="poly1"):
        load_config(None, ["train.loss=poly1"])


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_validates_and_names_a_known_backbone(path):
    """A shipped config with a misspelt key, a bad value or a backbone timm does not have would fail only
    when a user runs it; here it fails first."""
    import timm

    cfg = load_config(path)
    assert cfg["name"], path
    assert timm.is_model(cfg["model"]["backbone"]), f"{path.name}: unknown backbone {cfg['model']['backbone']}"
