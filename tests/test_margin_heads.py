"""Metric-learning heads (``model.head: arcface | cosface``): class centres on the unit sphere, logits =
scale * cos, and in training an angular margin on the true class; at prediction the plain cosine softmax."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config.loading import load_config
from pipeline.errors import ConfigError
from pipeline.training.losses import Criterion, Margin, margin_for
from pipeline.training.models import CosineHead, Head
from tests.test_task_kinds import brightness_competition


def test_the_cosine_head_gives_scale_times_the_cosine_to_the_closest_subcentre():
    torch.manual_seed(0)
    head = CosineHead(dim=8, out=3, scale=30.0, subcenters=2)
    z = torch.randn(5, 8)
    cos = torch.nn.functional.normalize(z, dim=-1) @ torch.nn.functional.normalize(head.weight, dim=-1).t()
    want = cos.reshape(5, 3, 2).amax(-1) * 30.0
    assert torch.allclose(head(z), want, atol=1e-5) and head(z).abs().max() <= 30.0
    assert torch.allclose(head(z * 7.0), head(z), atol=1e-4)  # the embedding's length does not count


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_the_margin_moves_only_the_true_class_and_only_in_training(kind):
    s, m = 16.0, 0.4
    cos = torch.tensor([[0.8, 0.1, -0.3], [0.2, 0.5, 0.0]])
    y = torch.tensor([0, 2])
    out = Margin(kind, s, m)(cos * s, y) / s
    theta = torch.acos(cos)
    want = cos.clone()
    want[0, 0] = math.cos(theta[0, 0] + m) if kind == "arcface" else cos[0, 0] - m
    want[1, 2] = math.cos(theta[1, 2] + m) if kind == "arcface" else cos[1, 2] - m
    assert torch.allclose(out, want, atol=1e-5)
    heads = [Head("target", ["target"], "multiclass", 3)]
    opts = {"loss": "auto", "label_smoothing": 0.0, "focal_gamma": 0.0, "ohem": 1.0, "class_weights": None}
    with_margin = Criterion(heads, opts, {"target"}, margin=Margin(kind, s, m))
    plain = Criterion(heads, opts, {"target"})  # the validation loss: the cosine softmax as predicted
    logits = {"target": cos * s}
    assert float(with_margin(logits, {"target": y})) > float(plain(logits, {"target": y})) + 0.5
    expected = torch.nn.functional.cross_entropy(cos * s, y)
    assert float(plain(logits, {"target": y})) == pytest.approx(float(expected), rel=1e-5)


def test_a_margin_head_is_refused_where_there_are_no_classes_and_is_off_by_default():
    with pytest.raises(ConfigError, match="model.head=arcface needs class targets"):
        load_config(None, ["competition.task=regression", "competition.metric=rmse", "model.head=arcface"])
    cfg = load_config(None, [])
    assert cfg["model"]["head"] == "linear" and margin_for(cfg["model"]) is None
    assert margin_for(load_config(None, ["model.head=cosface"])["model"]).m == 0.35


def test_an_arcface_model_trains_predicts_and_round_trips_through_its_checkpoint(tmp_path, monkeypatch):
    from pipeline.predict.predictor import Predictor
    from pipeline.stages import run_stage
    from pipeline.store.paths import head_prediction

    monkeypatch.chdir(tmp_path)
    root, truth = brightness_competition(tmp_path / "comp", "ordinal", n=200, n_test=40)
    cfg = load_config(None, [f"workdir={tmp_path}", f"competition.root={root}", "competition.task=multiclass",
                             "competition.metric=accuracy", "competition.group=grp", "data.in_chans=1",
                             "data.image_size=16", "folds.n_splits=2", "model.backbone=test_resnet",
                             "model.head=arcface", "model.head_scale=16", "model.head_subcenters=2",
                             "train.epochs=8", "train.batch_size=16", "train.lr=0.003", "features.embedding=true",
                             "name=arc"])
    for stage in ("folds", "train", "features"):
        run_stage(stage, cfg)
    state = torch.load(tmp_path / "models/arc/fold0/best.pt", weights_only=True)["model"]
    assert tuple(state["heads.target.weight"].shape)[0] == 5 * 2 and "heads.target.bias" not in state
    test = pd.read_parquet(tmp_path / "features/arc/test.parquet")
    probs = head_prediction(test, "arc", "target", "mean")
    accuracy = float((probs.argmax(1) == truth).mean())
    assert accuracy > 0.6, accuracy  # five brightness classes: chance is 0.2
    assert any("__embedding__" in c for c in test.columns)  # features keeps the embeddings
    # the checkpoint rebuilds the cosine head: the Predictor gives what features wrote
    pred = Predictor.from_experiment(tmp_path / "models/arc").predict(
        [root / "images" / f"{i}.png" for i in test["id"]])["target"]
    np.testing.assert_allclose(pred, probs, atol=1e-5)


def test_the_cosine_head_computes_in_float32_under_mixed_precision():
    from pipeline.training.models import CosineHead

    torch.manual_seed(0)
    head, z = CosineHead(64, 10, 30.0), torch.randn(8, 64)
    plain = head(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(z.bfloat16())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, head(z.bfloat16().float()), atol=1e-5, rtol=0)  # bf16 only in its input
    assert (mixed - plain).abs().max() < 0.5  # (a bf16 matmul would err by ~0.1-1 on logits of scale 30)
