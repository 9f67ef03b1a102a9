"""Every example of the README's "Extending the pipeline" runs as written, into the module its first line
names, and the option it adds is then accepted by the config and does its job."""
import importlib
import re
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config.loading import load_config

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> dict[str, list[str]]:
    """{module path named on the block's first line: [code blocks]} of the Extending section."""
    text = README.read_text()
    section = text[text.index("## Extending the pipeline"):]
    section = section[:section.index("\n## ", 5)] if "\n## " in section[5:] else section
    found: dict[str, list[str]] = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        first = block.splitlines()[0]
        assert first.startswith("# pipeline/"), f"an example must name its module on its first line: {first!r}"
        found.setdefault(first[2:], []).append(block)
    return found


EXAMPLES = _examples()


def _run_into(path: str, i: int = 0) -> dict:
    """Run example ``i`` of ``path`` in (a copy of) that module's namespace; a new module gets its own."""
    module = path.removesuffix(".py").replace("/", ".")
    try:
        ns = dict(vars(importlib.import_module(module)))
    except ModuleNotFoundError:
        ns = {"__name__": module}
    exec(compile(EXAMPLES[path][i], f"README:{path}", "exec"), ns)
    return ns


@pytest.fixture
def registered():
    """Undo what the examples registered, so other tests see the tables as shipped."""
    from pipeline import tasks
    from pipeline.level2 import models as level2
    from pipeline.predict import tta
    from pipeline.training import losses, models, optim

    tables = [losses.LOSSES["multiclass"]._items, optim.SCHEDULERS._items, tta.TTA_SETS._items,
              level2.LEVEL2_MODELS._items, level2.SAVED_MODELS._items, models.POOLS._items, optim.OPTIMIZERS.own,
              tasks.TASKS]
    before = [dict(t) for t in tables]
    yield
    for t, b in zip(tables, before):
        t.clear()
        t.update(b)


def test_every_example_names_a_place_and_all_places_are_covered():
    assert set(EXAMPLES) == {"pipeline/training/losses.py", "pipeline/tasks.py", "pipeline/training/optim.py",
                             "pipeline/predict/tta.py", "pipeline/level2/models.py", "pipeline/training/models.py",
                             "pipeline/stages/rank.py"}


def test_a_loss(registered):
    from pipeline.training.losses import HeadLoss
    from pipeline.training.models import Head

    _run_into("pipeline/training/losses.py")
    load_config(None, ["train.loss=poly1"])
    head = Head("t", ["t"], "multiclass", 3)
    opts = {"label_smoothing": 0.0, "focal_gamma": 2.0, "ohem": 1.0, "loss": "poly1"}
    logits, y = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), torch.tensor([0, 2])
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    pt = logits.softmax(-1)[torch.arange(2), y]
    assert torch.allclose(HeadLoss(head, "poly1", opts)(logits, y), ce + (1 - pt))


def test_a_task_kind(registered):
    from pipeline.competition.submission import to_submission
    from pipeline.stages.folds import stratify_labels

    _run_into("pipeline/tasks.py")
    cfg = load_config(None, ["competition.task=count", "competition.metric=rmse"])
    df = pd.DataFrame({"id": range(20), "target": np.arange(20) % 7})
    assert len(np.unique(stratify_labels(cfg.updated({"folds.bins": 4}), df))) == 4  # binned
    sample = pd.DataFrame({"id": ["a", "b"], "target": [0, 0]})
    out = to_submission(cfg, np.array([1.4, 2.6]), sample["id"], sample)
    assert out["target"].tolist() == [1, 3]  # submitted rounded, as the entry says
    with pytest.raises(Exception, match="competition.metric"):
        load_config(None, ["competition.task=count", "competition.metric=accuracy"])


def test_an_optimizer_and_a_schedule(registered):
    from pipeline.training.optim import SCHEDULERS, build_optimizer

    _run_into("pipeline/training/optim.py", 0)
    _run_into("pipeline/training/optim.py", 1)
    cfg = load_config(None, ["train.optimizer=adamw_amsgrad", "train.scheduler=linear", "train.epochs=2"])
    net = torch.nn.Module()
    net.backbone, net.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    opt = build_optimizer(net, cfg["train"])
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["amsgrad"]
    sched = SCHEDULERS["linear"](opt, cfg["train"], 5, True)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[-1]["lr"] == pytest.approx(cfg["train"]["lr"] * 0.5)


def test_a_tta_set(registered):
    from pipeline.predict.tta import tta_views

    _run_into("pipeline/predict/tta.py")
    load_config(None, ["features.tta=d4_small"])
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    views = tta_views("d4_small")
    assert len(views) == 4 and torch.equal(views[0](x), x)
    assert torch.equal(views[1](x), torch.rot90(x, 1, (2, 3))) or torch.equal(views[1](x), torch.rot90(x, -1, (2, 3)))


def test_a_level2_model_and_its_bundle_support(registered, tmp_path):
    from pipeline.level2.models import LEVEL2_MODELS, Level2Data, predict_saved, stage_models
    from pipeline.store.artifacts import ArtifactGroup

    _run_into("pipeline/level2/models.py")
    load_config(None, ["stack.model=mean"])
    rng = np.random.default_rng(0)
    preds, test_preds = [rng.random(12) for _ in range(2)], [rng.random(5) for _ in range(2)]
    X, T = pd.DataFrame({"a": preds[0], "b": preds[1]}), pd.DataFrame({"a": test_preds[0], "b": test_preds[1]})
    d = Level2Data(X, T, rng.random(12), np.arange(12) % 3, "regression", 1, ["a", "b"], preds, test_preds,
                   {"model": "mean", "test_mode": "mean", "stat": "mean"}, 0)
    result = LEVEL2_MODELS["mean"](d)
    np.testing.assert_allclose(result.oof, (preds[0] + preds[1]) / 2)
    with ArtifactGroup(tmp_path / "meta.json") as group:
        stage_models(group, tmp_path, d, result)
        group.commit({"stage_key": "k"})
    np.testing.assert_allclose(predict_saved(tmp_path, T, test_preds), result.test)  # what the notebook redoes


def test_a_pooling(registered):
    from pipeline.training.models import Pool

    _run_into("pipeline/training/models.py")
    load_config(None, ["model.pool=max"])
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(Pool("max")(x), x.amax((2, 3)))


def test_a_stage(tmp_path, monkeypatch):
    from pipeline.stages import STAGES, run_stage
    from pipeline.store.io import provenance, write_json, write_parquet

    ns = _run_into("pipeline/stages/rank.py")
    module = types.ModuleType("pipeline.stages.rank")
    module.__dict__.update(ns)
    monkeypatch.setitem(sys.modules, "pipeline.stages.rank", module)
    monkeypatch.setitem(STAGES, "rank", "rank")
    cfg = load_config(None, [f"workdir={tmp_path}", "name=exp"])
    src = tmp_path / "features" / "exp"
    src.mkdir(parents=True)
    write_parquet(src / "oof.parquet", pd.DataFrame({"id": [1, 2, 3], "f": [0.3, 0.1, 0.2]}),
                  provenance(cfg, "features", "k1"))
    write_json(src / "meta.json", provenance(cfg, "features", "k1"))
    monkeypatch.setattr("pipeline.store.leaderboard.check", lambda cfg: None)
    out = run_stage("rank", cfg)
    assert pd.read_parquet(out / "oof.parquet")["f"].tolist() == pytest.approx([1.0, 1 / 3, 2 / 3])
    assert run_stage("rank", cfg) == out  # up to date: nothing redone
