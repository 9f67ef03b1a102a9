import numpy as np
import pandas as pd
import pytest

from pipeline.config.loading import DEFAULTS
from pipeline.metrics import get_metric
from pipeline.stages import features as FE
from pipeline.stages import postprocess as PP
from pipeline.stages import submit as SU
from pipeline.stages import train as T
from pipeline.store.io import read_json
from tests.conftest import tiny_cfg

BASE = DEFAULTS["postprocess"]
rng = np.random.default_rng(0)


def cfg(**kw):
    return {**BASE, **kw}


def test_blend_weight_is_tuned_to_the_known_optimum():
    y = rng.normal(size=4000)
    a, b = y + rng.normal(scale=1, size=4000), y + rng.normal(scale=1, size=4000)
    assert PP.fit_rules(cfg(), "regression", get_metric("rmse"), y, a, other=b)["blend"] == pytest.approx(0.5, abs=0.1)
    assert PP.fit_rules(cfg(), "regression", get_metric("rmse"), y, a, other=y)["blend"] == 0.0
    assert PP.fit_rules(cfg(blend_weight=0.5), "regression", get_metric("rmse"), y, a, other=b)["blend"] == 0.5


def test_force_class_when_one_hot_head_is_confident():
    n, c = 2000, 4
    y = rng.integers(0, c, n)
    confident = rng.random(n) < 0.5
    p = np.full((n, c), 0.2)
    p[np.arange(n), np.where(confident, (y + 1) % c, y)] = 0.4  # the source is wrong exactly where the head is sure
    onehot = np.full((n, c), 0.1)
    onehot[np.arange(n), np.where(confident, y, (y + 2) % c)] = np.where(confident, 0.96, 0.7)
    t = PP.fit_rules(cfg(), "multiclass", get_metric("accuracy"), y, p, onehot=onehot)["force"]
    assert 0.7 <= t < 0.96
    forced = PP.apply_force(p, t, onehot, "multiclass")
    assert get_metric("accuracy")(y, forced) == 1.0
    reg = PP.apply_force(y.astype(float) * 0 + 1.5, 0.9, onehot, "regression")  # regression: forced to the class index
    assert np.allclose(reg[confident], y[confident])


def test_binary_threshold_finds_the_shifted_optimum():
    y = rng.integers(0, 2, 5000)
    score = np.clip(0.5 * y + rng.normal(0.25, 0.15, 5000), 0, 1) * 0.5  # the right cut is near 0.25
    t = PP.fit_rules(cfg(threshold=True), "binary", get_metric("accuracy"), y, score)["threshold"]
    assert t == pytest.approx(0.25, abs=0.05)
    assert ((PP.apply_threshold(score, t) >= 0.5) == (score >= t)).all()


def test_class_multipliers_undo_a_known_bias():
    n = 3000
    y = rng.integers(0, 3, n)
    p = np.eye(3)[y] * 0.5 + rng.dirichlet(np.ones(3), n) * 0.5
    biased = p * np.array([0.4, 1, 1])
    biased /= biased.sum(1, keepdims=True)
    m = PP.fit_rules(cfg(class_scale=True), "multiclass", get_metric("accuracy"), y, biased)["class_scale"]
    assert m[0] / max(m[1], m[2]) > 1.5
    acc = get_metric("accuracy")
    assert acc(y, PP.apply_scale(biased, m)) > acc(y, biased)


def test_ordinal_rounding_thresholds_raise_qwk():
    y = rng.integers(0, 5, 4000)
    pred = y * 0.7 + 0.3 + rng.normal(scale=0.3, size=4000)  # shrunk towards the middle
    params = PP.fit_rules(cfg(rounding=True), "ordinal", get_metric("qwk"), y, pred, target_range=(0, 4))
    tuned = PP.apply_rules(params, "ordinal", pred)
    q = get_metric("qwk")
    assert q(y, tuned) > q(y, np.clip(np.rint(pred), 0, 4)) + 0.02
    assert np.allclose(params["rounding"]["cuts"], [0.3 + 0.7 * (k + 0.5) for k in range(4)], atol=0.15)


def test_clip_to_target_range():
    params = PP.fit_rules(cfg(clip=True), "regression", get_metric("rmse"), np.array([0.0, 3.0]), np.array([-1.0, 5.0]),
                          target_range=(0.0, 3.0))
    assert PP.apply_rules(params, "regression", np.array([-1.0, 1.0, 5.0])).tolist() == [0.0, 1.0, 3.0]


def test_nested_cv_shows_overfit_tuning():
    y = rng.integers(0, 5, 300)
    p = rng.dirichlet(np.ones(5), 300)  # pure noise: any gain is overfitting
    fold = np.arange(300) % 5
    res, oof = PP.honest_gain(cfg(class_scale=True), "multiclass", get_metric("accuracy"), y, p, fold)
    assert res["in_sample_gain"] > 0
    assert res["nested_gain"] < res["in_sample_gain"]
    # what is handed on as OOF scores the nested figure, not the in-sample one
    assert get_metric("accuracy")(y, oof) == pytest.approx(res["nested"])
    assert get_metric("accuracy")(y, oof) < res["in_sample"]


def test_nested_bounds_come_from_the_other_folds_labels_only():
    # fold 0 alone holds the label 9: rules tuned without fold 0 must not know that 9 exists
    y = np.array([9.0, 1.0, 0.0, 3.0, 0.0, 1.0, 2.0, 3.0])
    fold = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    res, oof = PP.honest_gain(cfg(clip=True), "regression", get_metric("rmse"), y, y.copy(), fold)
    assert res["params"]["clip"] == [0.0, 9.0]  # the test predictions: every row's labels
    assert res["per_fold_params"]["fold0"]["clip"] == [0.0, 3.0]
    assert oof[0] == 3.0 and oof[1:].tolist() == y[1:].tolist()


def test_stage_writes_a_feature_set_that_submit_picks(workdir):
    c = tiny_cfg(workdir / "comp", "train.epochs=1", "postprocess.class_scale=true")
    T.run(c)
    FE.run(c)
    out = PP.run(c)
    assert out.name == "tiny-pp"
    res = read_json(out / "postprocess.json")
    assert {"in_sample_gain", "nested_gain", "params"} <= set(res)
    # the OOF handed on (to level 2, a blend, another round) is the nested one: fold k's rows went through
    # the rules tuned on the other folds, and its score is the CV that cv.json and the leaderboard show
    src = pd.read_parquet(FE.features_dir(c, "tiny") / "oof.parquet").set_index("id")
    pp = pd.read_parquet(out / "oof.parquet").set_index("id")
    cols = [col for col in src.columns if col.endswith("__mean")]
    for k, params in res["per_fold_params"].items():
        rows = pp.index[pp["fold"].astype(str) == k.removeprefix("fold")]
        want = PP.apply_rules(params, "multiclass", src.loc[rows, cols].to_numpy())
        assert np.allclose(pp.loc[rows, [col for col in pp.columns if col.endswith("__mean")]].to_numpy(), want)
    assert read_json(out / "cv.json")["overall"]["tta"] == pytest.approx(res["nested"])
    assert SU.run(c).name == "tiny-pp.csv"
    assert len(pd.read_parquet(out / "test.parquet")) == len(pd.read_csv("comp/test.csv"))
