from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config.loading import load_config
from pipeline.errors import InputError
from pipeline.stages import folds as F
from pipeline.store.io import read_json
from tests.conftest import config_for, make_competition

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-writers"


def fold_of(cfg):
    out = F.run(cfg)
    return pd.read_csv(out, dtype={"id": str}).set_index("id")["fold"]


def train(root):
    return pd.read_csv(root / "train.csv", dtype={"id": str}).set_index("id")


@pytest.mark.parametrize("method", ["stratified_group", "group"])
def test_group_methods_never_split_a_group(competition, tmp_path, method):
    cfg = config_for(competition, tmp_path, f"folds.method={method}")
    fold = fold_of(cfg)
    per_group = fold.groupby(train(competition)["grp"]).nunique()
    assert per_group.max() == 1
    assert sorted(fold.unique()) == list(range(5))


def test_stratified_keeps_class_shares(tmp_path):
    root = make_competition(tmp_path / "c", n=2000, images=False)
    cfg = config_for(root, tmp_path, "folds.method=stratified", "competition.check_images=false", group=None)
    fold = fold_of(cfg)
    y = train(root)["target"]
    shares = pd.crosstab(fold, y, normalize="index")
    assert (shares - y.value_counts(normalize=True)).abs().to_numpy().max() < 0.01


def test_regression_target_is_binned_for_stratification(tmp_path):
    root = make_competition(tmp_path / "c", n=1000, task="regression", images=False)
    cfg = config_for(root, tmp_path, "folds.method=stratified", "competition.check_images=false",
                     group=None, task="regression")
    fold = fold_of(cfg)
    y = train(root)["target"]
    means = y.groupby(fold).mean()
    assert (means - y.mean()).abs().max() < 0.05  # quantile bins keep each fold's mean close
    rnd = F.split("kfold", 5, 42, np.zeros(1000, dtype=int), None)
    assert (y.groupby(rnd).mean() - y.mean()).abs().max() >= (means - y.mean()).abs().max()


def test_deterministic_for_a_seed_and_seed_changes_split(competition, tmp_path):
    a = fold_of(config_for(competition, tmp_path / "a"))
    b = fold_of(config_for(competition, tmp_path / "b"))
    c = fold_of(config_for(competition, tmp_path / "c", "folds.seed=7"))
    assert a.equals(b)
    assert not a.equals(c)


def test_balance_matches_sizes_without_splitting_groups(tmp_path):
    sizes = [40, 35, 30, 30, 25, 20, 20, 15, 12, 10, 8, 6, 5, 4, 3, 3, 2, 2, 1, 1, 1, 1]
    root = make_competition(tmp_path / "c", group_sizes=sizes, images=False)
    common = ["folds.method=group", "competition.check_images=false", "folds.n_splits=3"]
    plain = fold_of(config_for(root, tmp_path / "p", *common))
    bal = fold_of(config_for(root, tmp_path / "b", *common, "folds.balance=true"))
    grp = train(root)["grp"]
    assert bal.groupby(grp).nunique().max() == 1
    counts = bal.value_counts()
    assert counts.max() - counts.min() <= 1
    assert counts.max() - counts.min() <= plain.value_counts().max() - plain.value_counts().min()


def test_balance_without_groups_moves_single_rows():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 100)
    fold = np.array([0] * 50 + [1] * 30 + [2] * 20)
    out = F.balance(fold, None, labels, 3)
    assert np.bincount(out).max() - np.bincount(out).min() <= 1


def test_report_and_provenance_written(cfg, tmp_path):
    out = F.run(cfg)
    meta = read_json(F.sidecar(out, ".meta.json"))
    assert meta["report"]["groups_in_several_folds"] == 0
    assert len(meta["config_hash"]) == 12 and "commit" in meta["git"]
    assert F.sidecar(out, ".report.png").read_bytes()[:4] == b"\x89PNG"
    assert "leakage check" in F.sidecar(out, ".report.txt").read_text()
    assert F.sidecar(out, ".config.yaml").read_text().startswith("# resolved config")


def test_rerun_when_up_to_date_does_nothing(cfg, capsys):
    out = F.run(cfg)
    mtime = out.stat().st_mtime_ns
    F.run(cfg)
    assert out.stat().st_mtime_ns == mtime
    assert "up to date" in capsys.readouterr().out


def _expect_error(cfg, tmp_path, match):
    with pytest.raises(InputError, match=match):
        F.run(cfg)
    folds_dir = tmp_path / "folds"
    assert not folds_dir.exists() or not any(folds_dir.iterdir()), "nothing may be written on failure"


def test_missing_train_file(tmp_path):
    cfg = config_for(tmp_path / "nowhere", tmp_path)
    _expect_error(cfg, tmp_path, r"nowhere/train.csv: train file not found")


def test_missing_column(competition, tmp_path):
    _expect_error(config_for(competition, tmp_path, "competition.target=label"), tmp_path,
                  r"train.csv: column\(s\) 'label' named by competition.target are missing")
    _expect_error(config_for(competition, tmp_path, group="writer"), tmp_path, r"'writer' named by competition.group")


def test_duplicate_ids(competition, tmp_path):
    df = pd.read_csv(competition / "train.csv")
    df.loc[5, "id"] = df.loc[2, "id"]
    df.to_csv(competition / "train.csv", index=False)
    _expect_error(config_for(competition, tmp_path), tmp_path, r"duplicate ids \(e.g. 'r00002' at line\(s\) 4, 7\)")


def test_nan_target_and_group(competition, tmp_path):
    df = pd.read_csv(competition / "train.csv")
    df.loc[3, "target"] = np.nan
    df.to_csv(competition / "train.csv", index=False)
    _expect_error(config_for(competition, tmp_path), tmp_path, r"target column 'target' is empty \(NaN\) at line\(s\) 5")
    df.loc[3, "target"] = 1
    df.loc[7, "grp"] = np.nan
    df.to_csv(competition / "train.csv", index=False)
    _expect_error(config_for(competition, tmp_path), tmp_path, r"group column 'grp' is empty \(NaN\) at line\(s\) 9")


def test_fewer_groups_than_folds(tmp_path):
    root = make_competition(tmp_path / "c", n_groups=3, images=False)
    _expect_error(config_for(root, tmp_path, "competition.check_images=false"), tmp_path,
                  r"only 3 groups, fewer than folds.n_splits=5")


def test_rare_class_is_named(competition, tmp_path):
    df = pd.read_csv(competition / "train.csv")
    df.loc[:2, "target"] = 9
    df.to_csv(competition / "train.csv", index=False)
    _expect_error(config_for(competition, tmp_path, "folds.method=stratified", group=None), tmp_path,
                  r"fewer members than folds.n_splits=5: 9 \(3 rows\)")


def test_missing_image_is_named(competition, tmp_path):
    (competition / "images" / "r00004.png").unlink()
    _expect_error(config_for(competition, tmp_path), tmp_path, r"no image file, e.g. id 'r00004' -> .*r00004.png")


@pytest.mark.skipif(not SHARED.exists(), reason="mnist-writers data not beside this checkout")
def test_mnist_writers_five_grouped_folds_within_one_point(tmp_path):
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs/mnist-writers.yaml"),
                      [f"competition.root={SHARED}", f"folds.file={tmp_path}/f.csv",
                                                       "competition.check_images=false"])
    out = F.run(cfg)
    fold = pd.read_csv(out, dtype={"id": str}).set_index("id")["fold"]
    df = train(SHARED)
    assert fold.groupby(df["writer"]).nunique().max() == 1
    shares = pd.crosstab(fold, df["target"], normalize="index")
    assert (shares - df["target"].value_counts(normalize=True)).abs().to_numpy().max() < 0.01


def test_search_keeps_the_best_stratified_of_its_seeds(tmp_path):
    """folds.search=N tries seeds seed..seed+N-1 and keeps the split with the smallest class-share gap."""
    root = make_competition(tmp_path / "c", n=300, n_groups=30, n_classes=4)
    df = pd.read_csv(root / "train.csv")
    base = config_for(root, tmp_path, "folds.n_splits=5", "folds.seed=3", "folds.balance=false")
    labels = F.stratify_labels(base, df)
    errors = [F.stratification_error(F.make_folds(config_for(root, tmp_path, "folds.n_splits=5", f"folds.seed={3 + t}",
                                                             "folds.balance=false"), df), labels) for t in range(6)]
    assert len(set(np.round(errors, 6))) > 1  # the seeds differ, so the choice matters
    searched = F.make_folds(config_for(root, tmp_path, "folds.n_splits=5", "folds.seed=3", "folds.balance=false",
                                       "folds.search=6"), df)
    assert F.stratification_error(searched, labels) == pytest.approx(min(errors))
