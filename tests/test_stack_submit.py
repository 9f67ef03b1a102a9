import numpy as np
import pandas as pd
import pytest

from pipeline.errors import InputError
from pipeline.level2 import models as L2
from pipeline.stages import features as FE
from pipeline.stages import stack as S
from pipeline.stages import submit as SU
from pipeline.stages import train as T
from pipeline.store.io import read_json, read_parquet_meta, write_parquet
from tests.conftest import tiny_cfg


@pytest.fixture
def level1(workdir):
    cfg = tiny_cfg(workdir / "comp", "train.epochs=2", "features.tta=hflip")
    T.run(cfg)
    FE.run(cfg)
    return cfg


def test_stack_uses_same_folds_and_writes_a_feature_set(level1):
    out = S.run(level1.updated({"stack.model": "lgbm"}))
    assert out.name == "tiny-l2"
    oof = pd.read_parquet(out / "oof.parquet")
    folds = pd.read_csv("folds/demo.csv", dtype={"id": str})
    assert list(oof["fold"]) == list(folds.set_index("id").loc[oof["id"], "fold"])
    assert [c for c in oof.columns if c.startswith("tiny-l2__target__")] == [f"tiny-l2__target__{j}__mean" for j in range(3)]
    assert np.allclose(oof.filter(like="__mean").sum(axis=1), 1, atol=1e-6)
    assert (out / "importance.png").read_bytes()[:4] == b"\x89PNG"


def test_level2_refuses_in_fold_outputs(level1):
    path = "features/tiny/oof.parquet"
    df = pd.read_parquet(path)
    meta = read_parquet_meta(path)
    df.loc[0, "fold"] = (df.loc[0, "fold"] + 1) % 3  # this row's features now claim a model that trained on it
    write_parquet(path, df, meta)
    with pytest.raises(InputError, match="in-fold leak"):
        S.run(level1)


def test_level2_refuses_features_from_another_folds_file(level1):
    path = "features/tiny/oof.parquet"
    meta = read_parquet_meta(path)
    write_parquet(path, pd.read_parquet(path), {**meta, "folds_hash": "0123456789ab"})
    with pytest.raises(InputError, match="SAME folds as level 1"):
        S.run(level1)


def test_weighted_average_finds_the_right_experiment():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    good = np.eye(3)[y] * 0.8 + 0.2 / 3
    noise = rng.dirichlet(np.ones(3), 300)
    w = L2.optimise_weights([noise, good], y, "multiclass")
    assert w.sum() == pytest.approx(1) and (w >= 0).all() and w[1] > 0.9
    yr = rng.normal(size=300)
    w = L2.optimise_weights([yr + rng.normal(scale=0.1, size=300), yr + rng.normal(scale=0.1, size=300)], yr, "regression")
    assert w == pytest.approx([0.5, 0.5], abs=0.15)


def _noise_feature_set(name="noise", seed=0):
    """A copy of features/tiny with random class probabilities (same folds, same provenance)."""
    import shutil

    shutil.copytree("features/tiny", f"features/{name}")
    rng = np.random.default_rng(seed)
    for part in ("oof", "test"):
        path = f"features/{name}/{part}.parquet"
        df, meta = pd.read_parquet(path), read_parquet_meta(path)
        cols = [c for c in df.columns if c.startswith("tiny__")]
        df = df.rename(columns={c: c.replace("tiny__", f"{name}__", 1) for c in cols})
        for stat in ("mean", "var", "max", "min"):
            block = [c for c in df.columns if c.startswith(f"{name}__target__") and c.endswith(f"__{stat}")]
            df[block] = rng.dirichlet(np.ones(len(block)), len(df))
        write_parquet(path, df, meta)


def _check_level2(out, level1):
    """OOF rows carry the folds file's fold, and the recorded CV is the OOF score."""
    oof = pd.read_parquet(out / "oof.parquet")
    folds = pd.read_csv("folds/demo.csv", dtype={"id": str}).set_index("id")["fold"]
    assert list(oof["fold"]) == list(folds.loc[oof["id"]])
    y = pd.read_csv("comp/train.csv", dtype={"id": str}).set_index("id").loc[oof["id"], "target"].to_numpy()
    p = oof[[c for c in oof.columns if c.endswith("__mean")]].to_numpy()
    acc = float((p.argmax(1) == y).mean())
    assert read_json(out / "cv.json")["overall"]["tta"] == pytest.approx(acc)
    for k in range(3):
        m = oof["fold"].to_numpy() == k
        assert read_json(out / "cv.json")[f"fold{k}"]["tta"] == pytest.approx(float((p[m].argmax(1) == y[m]).mean()))
    assert len(pd.read_parquet(out / "test.parquet")) == len(pd.read_csv("comp/test.csv"))
    return acc


def test_linear_level2(level1):
    out = S.run(tiny_cfg(level1["competition"]["root"], "stack.model=linear", "train.epochs=2",
                         "features.tta=hflip", "stack.name=l2-linear"))
    _check_level2(out, level1)
    oof = pd.read_parquet(out / "oof.parquet")
    assert np.allclose(oof.filter(like="__mean").sum(axis=1), 1, atol=1e-6)  # class probabilities per row


def test_weighted_level2_puts_its_weight_on_the_informative_experiment(level1):
    _noise_feature_set()
    out = S.run(tiny_cfg(level1["competition"]["root"], "stack.model=weighted", "stack.experiments=[tiny, noise]",
                         "train.epochs=2", "features.tta=hflip", "stack.name=l2-weighted"))
    _check_level2(out, level1)
    info = read_parquet_meta(out / "oof.parquet")["level2"]
    assert set(info["weights"]) == {"tiny", "noise"} and sum(info["weights"].values()) == pytest.approx(1)
    assert info["weights"]["tiny"] > 0.7
    assert sorted(info["fold_weights"]) == ["fold0", "fold1", "fold2"]
    # each fold's OOF rows are that fold's weighted blend of the two experiments' OOF predictions
    oof = pd.read_parquet(out / "oof.parquet")
    src = {e: pd.read_parquet(f"features/{e}/oof.parquet").set_index("id").loc[oof["id"]] for e in ("tiny", "noise")}
    for k, w in info["fold_weights"].items():
        m = (oof["fold"] == int(k[4:])).to_numpy()
        blend = sum(w[e] * src[e][[f"{e}__target__{j}__mean" for j in range(3)]].to_numpy()[m] for e in w)
        assert np.allclose(oof[[f"l2-weighted__target__{j}__mean" for j in range(3)]].to_numpy()[m], blend, atol=1e-9)


def test_refit_mode(level1):
    mean_dir = S.run(level1.updated({"stack.model": "lgbm"}))
    refit = S.run(tiny_cfg(level1["competition"]["root"], "stack.model=lgbm", "stack.test_mode=refit", "stack.refit_coef=1.2",
                           "train.epochs=2", "features.tta=hflip", "stack.name=refit"))
    meta = read_parquet_meta(refit / "oof.parquet")
    assert meta["level2"]["refit_iterations"] == max(1, int(np.mean(meta["best_iterations"]) * 1.2))
    # refit changes only the test predictions: OOF rows still come from the per-fold models
    a, b = pd.read_parquet(mean_dir / "oof.parquet"), pd.read_parquet(refit / "oof.parquet")
    assert np.allclose(a.filter(like="__mean").to_numpy(), b.filter(like="__mean").to_numpy())
    ta, tb = pd.read_parquet(mean_dir / "test.parquet"), pd.read_parquet(refit / "test.parquet")
    assert not np.allclose(ta.filter(like="__mean").to_numpy(), tb.filter(like="__mean").to_numpy())


def test_submit_writes_sample_shape_and_scores_public_private(level1):
    S.run(level1)
    out = SU.run(level1)
    assert out.name == "tiny-l2.csv"
    sub, sample = pd.read_csv(out, dtype={"id": str}), pd.read_csv("comp/sample_submission.csv", dtype={"id": str})
    assert list(sub.columns) == list(sample.columns) and list(sub["id"]) == list(sample["id"])
    assert sub["target"].dtype.kind == "i"
    summary = read_json("submissions/tiny-l2.json")
    sol = pd.read_csv("comp/solution.csv", dtype={"id": str})
    pub = sol["Usage"] == "Public"
    assert summary["local"]["public"] == pytest.approx((sub["target"][pub] == sol["target"][pub]).mean())
    assert summary["local"]["private"] == pytest.approx((sub["target"][~pub] == sol["target"][~pub]).mean())


def test_gzip_submission(level1):
    out = SU.run(tiny_cfg(level1["competition"]["root"], "train.epochs=2", "features.tta=hflip", "submit.gzip=true"))
    assert out.name == "tiny.csv.gz" and out.read_bytes()[:2] == b"\x1f\x8b"
    assert len(pd.read_csv(out)) == len(pd.read_csv("comp/sample_submission.csv"))


@pytest.fixture
def sample():
    return pd.DataFrame({"id": ["a", "b", "c"], "target": [0, 0, 0]})


@pytest.mark.parametrize("mutate,match", [
    (lambda s: s.iloc[:2], "missing"),
    (lambda s: pd.concat([s, pd.DataFrame({"id": ["z"], "target": [1]})]), "not in sample_submission"),
    (lambda s: s.iloc[[1, 0, 2]], "order"),
    (lambda s: s.rename(columns={"target": "label"}), "columns"),
    (lambda s: s.assign(target=[1.0, np.nan, 2.0]), "NaN/inf"),
    (lambda s: s.assign(target=[1.0, np.inf, 2.0]), "NaN/inf"),
    (lambda s: s.assign(target=[1.5, 1.0, 2.0]), "integers"),
    (lambda s: s.assign(id=["a", "a", "c"]), "missing"),
    (lambda s: s.assign(target=["x", "y", "z"]), "not numeric"),
])
def test_submission_validation_catches_malformed(sample, mutate, match):
    with pytest.raises(SU.SubmissionError, match=match):
        SU.validate(mutate(sample.copy()), sample, "id")
    SU.validate(sample.assign(target=[1, 2, 0]), sample, "id")  # a good one passes


def test_level2_says_plainly_when_it_loses_to_its_best_input_and_auto_picks_by_cv(level1, capsys):
    """Level 2 is scored against its best input on the same rows and folds; `auto` (the default) keeps
    the weighted blend unless LightGBM beats it on OOF."""
    _noise_feature_set()
    cfg = tiny_cfg(level1["competition"]["root"], "stack.experiments=[tiny, noise]", "train.epochs=2",
                   "features.tta=hflip", "stack.model=lgbm", "stack.name=l2-lgbm")
    out = S.run(cfg)
    guard = read_parquet_meta(out / "oof.parquet")["level2"]["versus_best_input"]
    level1_acc = read_json("features/tiny/cv.json")["overall"]["tta"]
    assert guard["best_input"] == "tiny" and guard["best_input_cv"] == pytest.approx(level1_acc)
    l2 = read_json(out / "cv.json")["overall"]["tta"]
    printed = capsys.readouterr().out
    assert guard["wins"] == (l2 > level1_acc)
    assert ("WARNING: level 2" in printed) == (not guard["wins"])
    # the leaderboard row says what the stack is and, when it loses, to which input
    import sqlite3

    note = sqlite3.connect("submissions/leaderboard.db").execute(
        "SELECT note FROM runs WHERE experiment = 'l2-lgbm' AND stage = 'stack'").fetchone()[0]
    assert note.startswith("lgbm on tiny, noise")
    assert ("does not beat its input tiny" in note) == (not guard["wins"])
    auto = S.run(tiny_cfg(level1["competition"]["root"], "stack.experiments=[tiny, noise]", "train.epochs=2",
                          "features.tta=hflip", "stack.name=l2-auto"))
    info = read_parquet_meta(auto / "oof.parquet")["level2"]
    assert set(info["auto"]) == {"weighted", "lgbm"} and info["chosen"] == max(info["auto"], key=info["auto"].get)
    assert set(info["fold_choice"]) == {"fold0", "fold1", "fold2"}
    if set(info["fold_choice"].values()) == {info["chosen"]}:  # the nested choice agrees on every fold
        assert read_json(auto / "cv.json")["overall"]["tta"] == pytest.approx(max(info["auto"].values()))


@pytest.mark.parametrize("model", ["weighted", "linear"])
def test_level2_fold_k_is_fitted_without_fold_ks_labels(model):
    """Every level-2 model: fold k's OOF predictions come from a fit on the other folds' rows only, so
    flipping fold k's labels cannot change them."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=300)
    y = (a + 0.5 * rng.normal(size=300) > 0).astype(int)
    p1, p2 = 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-a - rng.normal(size=300)))  # two experiments' P(class 1)
    X = pd.DataFrame({"e1": p1, "e2": p2})
    fold = np.arange(300) % 3
    metric = __import__("pipeline.metrics", fromlist=["get_metric"]).get_metric("logloss")

    def fit(labels):
        d = L2.Level2Data(X, X.iloc[:10], labels, fold, "binary", 1, ["e1", "e2"], [p1, p2], [p1[:10], p2[:10]],
                          {"lgbm": {}, "test_mode": "mean", "refit_coef": 1.0, "model": model, "stat": "mean"}, 0,
                          metric)
        return L2.LEVEL2_MODELS[model](d)

    flipped = y.copy()
    flipped[fold == 0] = 1 - flipped[fold == 0]  # only the scored fold's labels change
    before, after = fit(y), fit(flipped)
    assert np.allclose(before.oof[fold == 0], after.oof[fold == 0])
    assert not np.allclose(before.oof[fold == 1], after.oof[fold == 1])  # the other folds' fits did see them


def test_auto_chooses_fold_ks_level2_model_on_the_other_folds(monkeypatch):
    """`auto`'s choice is a fit too: fold k's OOF rows come from the candidate that wins on the other folds,
    so a candidate that shines only on fold k cannot lift fold k's score; the test predictions come from
    the choice on every row."""
    y = np.tile([0, 1], 150)
    fold = np.arange(300) % 3
    right, wrong = np.where(y == 1, 0.9, 0.1), np.where(y == 1, 0.1, 0.9)
    # "weighted": right on all of fold 0, right on 60% of folds 1-2 (73% overall); "lgbm": right on 70% everywhere
    blend = np.where((fold == 0) | (np.arange(300) % 10 < 6), right, wrong)
    trees = np.where(np.arange(300) % 10 < 7, right, wrong)
    fake = lambda p, t: lambda d: L2.Level2Result(p.copy(), np.full(10, t))
    monkeypatch.setitem(L2.LEVEL2_MODELS._items, "weighted", fake(blend, 0.0))
    monkeypatch.setitem(L2.LEVEL2_MODELS._items, "lgbm", fake(trees, 1.0))
    d = L2.Level2Data(pd.DataFrame({"e": blend}), pd.DataFrame({"e": np.zeros(10)}), y, fold, "binary", 1, ["e"],
                      [blend], [np.zeros(10)], {"model": "auto"}, 0, __import__("pipeline.metrics", fromlist=["x"])
                      .get_metric("accuracy"))
    res = L2.auto(d)
    assert res.info["chosen"] == "weighted" and np.all(res.test == 0.0)  # the choice on every row, for test
    assert res.info["fold_choice"] == {"fold0": "lgbm", "fold1": "weighted", "fold2": "weighted"}
    assert np.allclose(res.oof[fold == 0], trees[fold == 0]) and np.allclose(res.oof[fold != 0], blend[fold != 0])


def test_lgbm_early_stopping_never_looks_at_the_scored_fold():
    """The number of trees of fold k's model is chosen on an inner split of its training rows: changing
    fold k's labels cannot change fold k's model."""
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"a": rng.normal(size=300), "b": rng.normal(size=300)})
    y = (X["a"] + 0.5 * rng.normal(size=300) > 0).astype(int).to_numpy()
    fold = np.arange(300) % 3

    def fit(labels):
        d = L2.Level2Data(X, X.iloc[:10], labels, fold, "binary", 1, ["e"], [], [],
                          {"lgbm": {}, "test_mode": "mean", "refit_coef": 1.0, "model": "lgbm", "stat": "mean"}, 0)
        return L2.lgbm(d)

    a = fit(y)
    flipped = y.copy()
    flipped[fold == 0] = 1 - flipped[fold == 0]  # only the scored fold's labels change
    b = fit(flipped)
    assert a.best_iterations[0] == b.best_iterations[0]
    assert np.allclose(a.oof[fold == 0], b.oof[fold == 0])


def test_rows_are_matched_by_id_not_by_position_through_the_chain(workdir):
    """A folds file in another row order than train.csv: every stage's OOF rows keep the fold their id
    has in the folds file (a stage that matched rows by position would move them to other folds)."""
    from pipeline.stages import postprocess as PP

    cfg = tiny_cfg(workdir / "comp", "train.epochs=1")
    folds_path = workdir / "folds" / "demo.csv"
    folds = pd.read_csv(folds_path, dtype={"id": str})
    folds.sample(frac=1, random_state=0).to_csv(folds_path, index=False)  # same folds, shuffled rows
    T.run(cfg)
    FE.run(cfg)
    train = pd.read_csv(workdir / "comp" / "train.csv", dtype={"id": str})
    out_s = S.run(tiny_cfg(workdir / "comp", "train.epochs=1", "stack.model=weighted", "stack.experiments=[tiny]",
                           "stack.name=l2"))
    out_p = PP.run(tiny_cfg(workdir / "comp", "train.epochs=1", "postprocess.source=tiny", "postprocess.class_scale=true"))
    want = folds.set_index("id")["fold"]
    for out in (FE.features_dir(cfg, "tiny"), out_s, out_p):
        oof = pd.read_parquet(out / "oof.parquet")
        assert sorted(oof["id"]) == sorted(train["id"])
        assert (oof.set_index("id")["fold"].astype(int) == want.loc[oof["id"]].to_numpy()).all(), out
