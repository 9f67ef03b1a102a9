"""Repeated folds (``folds.repeats``) and what the fold-mean submission should score: R x K fold models
through train, features, stack and the bundle; each row's OOF is the mean of the R models that never saw
it; the predicted submission score is shown beside CV in cv.json, the leaderboard and its plot."""
import json

import numpy as np
import pandas as pd
import pytest

from pipeline.config.loading import load_config
from pipeline.metrics import fold_mean_estimate, get_metric
from tests.test_task_kinds import brightness_competition


def truth_of(root, ids):
    return pd.read_csv(root / "train.csv", dtype={"id": str}).set_index("id").loc[list(ids), "target"].to_numpy()


def test_repeats_split_again_with_another_seed_and_keep_groups_whole(tmp_path, monkeypatch):
    from pipeline.stages import run_stage

    monkeypatch.chdir(tmp_path)
    root, _ = brightness_competition(tmp_path / "comp", "ordinal", n=120, n_test=4)
    cfg = load_config(None, [f"workdir={tmp_path}", f"competition.root={root}", "competition.task=ordinal",
                             "competition.metric=qwk", "competition.group=grp", "folds.n_splits=3", "folds.repeats=3"])
    df = pd.read_csv(run_stage("folds", cfg), dtype={"id": str})
    assert list(df.columns) == ["id", "fold", "fold_1", "fold_2"]
    groups = pd.read_csv(root / "train.csv", dtype={"id": str}).set_index("id").loc[df["id"], "grp"].to_numpy()
    for r, col in enumerate(["fold", "fold_1", "fold_2"]):
        assert sorted(df[col].unique()) == [3 * r, 3 * r + 1, 3 * r + 2]  # model numbers unique over repeats
        assert (pd.Series(df[col].to_numpy()).groupby(groups).nunique() == 1).all()  # no group in two folds
    assert (df["fold"].to_numpy() != df["fold_1"].to_numpy() - 3).any()  # another split, not a renumbering
    # one repeat is the folds file it always was (same key: nothing reruns for existing users)
    single = load_config(None, [f"workdir={tmp_path}", f"competition.root={root}", "competition.task=ordinal",
                                "competition.metric=qwk", "competition.group=grp", "folds.n_splits=3",
                                "folds.file=folds/one.csv"])
    assert list(pd.read_csv(run_stage("folds", single)).columns) == ["id", "fold"]


def test_the_estimate_extrapolates_the_repeats_ensemble_in_one_over_models():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    oofs = [np.eye(3)[y] * 0.4 + rng.dirichlet(np.ones(3), 400) * 0.6 for _ in range(2)]
    tests = [rng.dirichlet(np.ones(3), 50) for _ in range(10)]
    fm = fold_mean_estimate("accuracy", y, oofs, tests, probabilities=True)
    acc = get_metric("accuracy")
    s1, s2 = np.mean([acc(y, o) for o in oofs]), acc(y, (oofs[0] + oofs[1]) / 2)
    assert fm["repeat_ensemble"] == pytest.approx(s2) and fm["single_score"] == pytest.approx(s1)
    assert fm["predicted"] == pytest.approx(s1 + (s2 - s1) * (1 - 1 / 10) / (1 - 1 / 2))
    assert fm["how"].startswith("estimate")
    # one repeat: no identity for accuracy, so no number is made up
    assert fold_mean_estimate("accuracy", y, oofs[:1], tests, probabilities=True)["predicted"] is None


def test_repeated_folds_run_the_chain_and_the_bundle(tmp_path, monkeypatch):
    from pipeline.kaggle.inference import predict
    from pipeline.stages import run_stage
    from pipeline.store import leaderboard as LB
    from pipeline.store.paths import head_prediction

    monkeypatch.chdir(tmp_path)
    root, truth = brightness_competition(tmp_path / "comp", "ordinal")
    over = [f"workdir={tmp_path}", f"competition.root={root}", "competition.task=ordinal", "competition.metric=qwk",
            "competition.group=grp", "data.in_chans=1", "data.image_size=16", "folds.n_splits=2", "folds.repeats=2",
            "model.backbone=test_resnet", "train.epochs=2", "train.batch_size=16", "train.lr=0.003",
            "features.batch_size=64", "name=rep"]
    cfg = load_config(None, over)
    for stage in ("folds", "train", "features"):
        run_stage(stage, cfg)
    assert sorted(p.name for p in (tmp_path / "models" / "rep").glob("fold*")) == ["fold0", "fold1", "fold2", "fold3"]
    folds = pd.read_csv(tmp_path / "folds" / "demo.csv", dtype={"id": str}).set_index("id")
    out = tmp_path / "features" / "rep"
    oof = pd.read_parquet(out / "oof.parquet").set_index("id")
    parts = {m: pd.read_parquet(out / "parts" / f"fold{m}_oof.parquet").set_index("id") for m in range(4)}
    for m, part in parts.items():  # each model's OOF rows are the ones it held out in its repeat
        column = "fold" if m < 2 else "fold_1"
        assert set(part.index) == set(folds.index[folds[column] == m])
    # each row's OOF is the mean of its two held-out models' predictions, one per repeat
    col = [c for c in oof.columns if c.endswith("__mean")][0]
    for rid in list(oof.index[:5]):
        owners = [folds.loc[rid, "fold"], folds.loc[rid, "fold_1"]]
        assert oof.loc[rid, col] == pytest.approx(np.mean([parts[m].loc[rid, col] for m in owners]), rel=1e-5)
    assert (oof["fold"] == folds.loc[oof.index, "fold"]).all()  # level 2 keeps repeat 0's folds
    cv = json.loads((out / "cv.json").read_text())
    assert sorted(k for k in cv if k.startswith("fold")) == ["fold0", "fold1", "fold2", "fold3"]
    assert len(cv["repeats"]["scores"]) == 2 and cv["repeats"]["std"] >= 0
    assert cv["overall"]["tta"] == pytest.approx(np.mean(cv["repeats"]["scores"]))  # CV: still one model's
    sub = cv["submission"]
    assert sub["models"] == 4 and sub["repeats"] == 2 and sub["how"].startswith("estimate")
    assert sub["predicted"] == pytest.approx(sub["single_score"] + (sub["repeat_ensemble"] - sub["single_score"])
                                             * (1 - 1 / 4) / (1 - 1 / 2))
    # the test rows: the mean over all four models
    per = pd.read_parquet(out / "test_folds.parquet")
    mean = np.mean([head_prediction(g, "rep", "target", "mean") for _, g in per.groupby("fold")], axis=0)
    np.testing.assert_allclose(head_prediction(pd.read_parquet(out / "test.parquet"), "rep", "target", "mean"), mean,
                               rtol=1e-5)

    cfg = load_config(None, [*over, "postprocess.rounding=true"])
    for stage in ("stack", "postprocess", "submit"):
        run_stage(stage, cfg)
    scv = json.loads((tmp_path / "features" / "rep-l2" / "cv.json").read_text())
    # level 2 was scored on its input's OOF; its submission gets the lift the input's estimate predicts
    fed = get_metric("qwk")(truth_of(root, oof.index), head_prediction(oof.reset_index(), "rep", "target", "mean"))
    assert scv["submission"]["lift"] == pytest.approx(sub["predicted"] - fed)
    assert scv["submission"]["predicted"] == pytest.approx(scv["overall"]["tta"] + scv["submission"]["lift"])
    pcv = json.loads((tmp_path / "features" / "rep-l2-pp" / "cv.json").read_text())
    assert pcv["submission"]["predicted"] == pytest.approx(pcv["overall"]["tta"] + pcv["submission"]["lift"])
    # the submission's summary carries the three numbers: CV, the predicted score, the local LB
    summary = json.loads((tmp_path / "submissions" / "rep-l2-pp.json").read_text())
    assert summary["predicted"] == pytest.approx(pcv["submission"]["predicted"]) and "private" in summary["local"]
    row = LB.table(tmp_path / "submissions" / "leaderboard.db").set_index("experiment")
    assert row.loc["rep", "predicted"] == pytest.approx(sub["predicted"])
    assert row.loc["rep", "repeat_std"] == pytest.approx(cv["repeats"]["std"])
    assert row.loc["rep-l2", "predicted"] == pytest.approx(scv["submission"]["predicted"])
    bundle = run_stage("kaggle", load_config(None, [*over, "postprocess.rounding=true", "kaggle.source=rep-l2-pp"]))
    assert len(json.loads((bundle / "bundle.json").read_text())["sets"]["rep"]["models"]) == 4
    frame, _ = predict(bundle, root, device="cpu")
    submitted = pd.read_csv(tmp_path / "submissions" / "rep-l2-pp.csv")
    np.testing.assert_allclose(frame["target"].to_numpy(dtype=float), submitted["target"].to_numpy(dtype=float),
                               atol=1e-3)
