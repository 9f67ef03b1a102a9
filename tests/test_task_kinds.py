"""Binary, regression and ordinal competitions end to end: folds -> train -> features -> stack (auto) ->
postprocess (each task's own rule) -> submit -> the bundle's notebook run offline, scored on a solution.csv."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config.loading import load_config
from pipeline.metrics import get_metric
from tests.test_kaggle import image_links  # noqa: F401  (a fixture: a Kaggle-like image's packages)

# task -> (metric, its postprocess rule, labels drawn for n rows)
KINDS = {
    "binary": ("auc", "postprocess.threshold=true", lambda rng, n: rng.integers(0, 2, n)),
    "regression": ("rmse", "postprocess.clip=true", lambda rng, n: rng.uniform(0, 4, n)),
    "ordinal": ("qwk", "postprocess.rounding=true", lambda rng, n: rng.integers(0, 5, n)),
}


def brightness_competition(root, task: str, n: int = 150, n_test: int = 40, seed: int = 0):
    """Grey 16 px images whose brightness says the target (a tiny net learns it in two epochs)."""
    rng = np.random.default_rng(seed)
    draw = KINDS[task][2]
    y, ty = draw(rng, n), draw(rng, n_test)
    top = 1.0 if task == "binary" else 4.0
    (root / "images").mkdir(parents=True)
    ids, tids = [f"r{i}" for i in range(n)], [f"t{i}" for i in range(n_test)]
    for i, v in zip(ids + tids, list(y) + list(ty)):
        level = 40 + 170 * float(v) / top
        arr = np.clip(rng.normal(level, 12, (16, 16)), 0, 255).astype(np.uint8)
        Image.fromarray(arr, mode="L").save(root / "images" / f"{i}.png")
    pd.DataFrame({"id": ids, "target": y, "grp": rng.integers(0, 15, n)}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": tids}).to_csv(root / "test.csv", index=False)
    sample = 0.0 if task == "regression" else 0
    pd.DataFrame({"id": tids, "target": sample}).to_csv(root / "sample_submission.csv", index=False)
    pd.DataFrame({"id": tids, "target": ty, "Usage": ["Public", "Private"] * (n_test // 2)}).to_csv(
        root / "solution.csv", index=False)
    return root, ty


@pytest.mark.parametrize("task", sorted(KINDS))
def test_a_task_kind_runs_the_whole_chain_and_the_offline_notebook(task, image_links, tmp_path, monkeypatch):  # noqa: F811
    from pipeline.stages import run_stage
    from tests.test_kaggle import run_notebook

    monkeypatch.chdir(tmp_path)
    root, truth = brightness_competition(tmp_path / "comp", task)
    metric, rule, _ = KINDS[task]
    over = [f"workdir={tmp_path}", f"competition.root={root}", f"competition.task={task}",
            f"competition.metric={metric}", "competition.group=grp", "data.in_chans=1", "data.image_size=16",
            "folds.n_splits=3", "model.backbone=test_resnet", "train.epochs=3", "train.batch_size=16",
            "train.lr=0.003", "features.batch_size=64", rule, f"name={task}"]
    cfg = load_config(None, over)
    for stage in ("folds", "train", "features", "stack", "postprocess", "submit"):
        run_stage(stage, cfg)
    source = f"{task}-l2-pp"
    sub = pd.read_csv(tmp_path / "submissions" / f"{source}.csv")
    score = get_metric(metric)(truth, sub["target"].to_numpy())
    constant = get_metric(metric)(truth, np.full(len(truth), float(np.mean(truth)) if task != "ordinal" else 2))
    print(f"\n[{task}] {metric} of the submission on solution.csv: {score:.4f} (a constant: {constant:.4f})")
    better = score > constant if get_metric(metric).higher_is_better else score < constant
    assert better, (score, constant)
    if task == "ordinal":  # an integer sample column: the submission is rounded integers
        assert pd.api.types.is_integer_dtype(sub["target"]) and set(sub["target"]) <= set(range(5))
    if task == "binary":  # AUC is scored on probabilities: submitted as such
        assert sub["target"].between(0, 1).all() and sub["target"].nunique() > 2
    bundle = run_stage("kaggle", load_config(None, [*over, f"kaggle.source={source}"]))
    (tmp_path / "notebook").mkdir()  # the bundle's notebook, headless and offline, writes the same submission
    run_notebook(bundle, root, tmp_path / "submissions" / f"{source}.csv", image_links, tmp_path / "notebook",
                 monkeypatch)


def test_the_fold_mean_prediction_is_the_ambiguity_decomposition_of_the_test_rows(tmp_path, monkeypatch):
    """The mean of the fold models' squared errors on the test rows, less the ambiguity features reports,
    is exactly the squared error of their mean (the submission); the predicted RMSE puts the CV in for the
    first term."""
    import json

    from pipeline.stages import run_stage
    from pipeline.store.paths import head_prediction

    monkeypatch.chdir(tmp_path)
    root, truth = brightness_competition(tmp_path / "comp", "regression")
    cfg = load_config(None, [f"workdir={tmp_path}", f"competition.root={root}", "competition.task=regression",
                             "competition.metric=rmse", "competition.group=grp", "data.in_chans=1",
                             "data.image_size=16", "folds.n_splits=3", "model.backbone=test_resnet", "train.epochs=2",
                             "train.batch_size=16", "train.lr=0.003", "name=reg"])
    for stage in ("folds", "train", "features"):
        run_stage(stage, cfg)
    out = tmp_path / "features" / "reg"
    fm = json.loads((out / "fold_mean.json").read_text())
    per_model = pd.read_parquet(out / "test_folds.parquet")
    preds = [head_prediction(g, "reg", "target", "mean") for _, g in per_model.groupby("fold", sort=True)]
    mean_pred = head_prediction(pd.read_parquet(out / "test.parquet"), "reg", "target", "mean")
    single = np.mean([np.mean((p - truth) ** 2) for p in preds])
    assert fm["models"] == 3 and fm["ambiguity"] > 0
    # (to float32 precision: the feature files store float32)
    assert single - fm["ambiguity"] == pytest.approx(np.mean((mean_pred - truth) ** 2), rel=1e-6)
    actual = float(np.sqrt(np.mean((mean_pred - truth) ** 2)))
    assert fm["predicted"] == pytest.approx(np.sqrt(fm["single_cv"] - fm["ambiguity"]))
    print(f"\n[fold-mean] CV rmse {np.sqrt(fm['single_cv']):.4f}, predicted fold-mean rmse {fm['predicted']:.4f}, "
          f"actual on the test rows {actual:.4f}")
