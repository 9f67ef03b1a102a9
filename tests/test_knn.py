"""Metric learning's retrieval half (``make knn``): cosine neighbours, the new-individual threshold, the OOF rule
(fold k's rows are searched only among the rows fold k's model trained on), and the bundle that carries the
indexes and reproduces the kNN test predictions."""
import numpy as np
import pandas as pd
import pytest

from pipeline.config.loading import load_config
from pipeline.metrics import get_metric
from pipeline.predict import neighbours
from tests.test_task_kinds import brightness_competition


def _cluster(rng, centre, n, spread=0.05):
    return centre + rng.normal(0, spread, (n, len(centre)))


def test_neighbours_are_the_brute_force_cosine_neighbours():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    index = neighbours.Index(neighbours.normalise(rng.normal(size=(300, 16))), rng.integers(0, 4, 300),
                             np.arange(300))
    queries = rng.normal(size=(50, 16))
    sims, rows = index.search(queries, 7, block=16)  # (blocks smaller than the queries)
    dist, want = NearestNeighbors(n_neighbors=7, metric="cosine").fit(index.embeddings).kneighbors(queries)
    np.testing.assert_allclose(sims, 1 - dist, atol=1e-3)  # the same neighbours (the index is kept at half precision)
    assert (np.sort(rows, axis=1) == np.sort(want, axis=1)).all(axis=1).mean() > 0.95
    assert (np.diff(sims, axis=1) <= 0).all()  # most similar first
    score = neighbours.class_scores(sims, index.classes[rows], 4)
    for q in range(50):  # a class's score is its nearest neighbour's similarity; absent classes have none
        for c in range(4):
            hit = sims[q][index.classes[rows[q]] == c]
            assert score[q, c] == (hit.max() if len(hit) else -np.inf)
    p = neighbours.probabilities(score, 30.0)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert (p[~np.isfinite(score)] == 0).all() and (p.argmax(1) == score.argmax(1)).all()


def test_a_query_less_similar_than_the_threshold_is_a_new_individual():
    rng = np.random.default_rng(1)
    a, b, c = np.eye(8)[0], np.eye(8)[1], np.eye(8)[2]  # two known individuals; c is nobody the index holds
    index = neighbours.Index(neighbours.normalise(np.vstack([_cluster(rng, a, 20), _cluster(rng, b, 20)])),
                             np.repeat([0, 1], 20), np.arange(40))
    queries = np.vstack([_cluster(rng, a, 10), _cluster(rng, b, 10), _cluster(rng, c, 10)])
    truth = np.repeat([0, 1, 2], 10)  # class 2: "new individual"
    sims, rows = index.search(queries, 5)
    score = neighbours.class_scores(sims, index.classes[rows], 3)
    accuracy = get_metric("accuracy")
    assert accuracy(truth, neighbours.probabilities(score, 30)) == pytest.approx(2 / 3)  # the new ones go astray
    t = neighbours.tune_threshold(accuracy, truth, score, 30.0, new_class=2)
    assert 0.2 < t < 0.9, t  # between the new ones' best similarity (~0) and the known ones' (~1)
    p = neighbours.predict(index, queries, 5, 30.0, 3, new_class=2, threshold=t)
    assert accuracy(truth, p) == 1.0


def test_fold_k_searches_only_its_own_training_rows_and_the_bundle_reproduces_the_knn_predictions(
        tmp_path, monkeypatch):
    from pipeline.kaggle.inference import predict
    from pipeline.predict.model_run import ModelRun
    from pipeline.stages import run_stage
    from pipeline.store.paths import head_prediction

    monkeypatch.chdir(tmp_path)
    root, truth = brightness_competition(tmp_path / "comp", "ordinal", n=150, n_test=30)
    over = [f"workdir={tmp_path}", f"competition.root={root}", "competition.task=multiclass",
            "competition.metric=accuracy", "competition.group=grp", "data.in_chans=1", "data.image_size=16",
            "folds.n_splits=3", "model.backbone=test_resnet", "model.head=arcface", "model.head_scale=16",
            "train.epochs=5", "train.batch_size=16", "train.lr=0.003", "name=arc", "knn.new_label=4",
            "stack.experiments=[arc,arc-knn]", "stack.model=weighted", "kaggle.source=arc-knn"]
    cfg = load_config(None, over)
    tuned = []  # (rows each threshold was tuned on)
    real = neighbours.tune_threshold
    monkeypatch.setattr(neighbours, "tune_threshold", lambda metric, y, *a: tuned.append(len(y)) or real(metric, y, *a))
    for stage in ("folds", "train", "features", "knn", "stack"):
        run_stage(stage, cfg)
    train, folds = pd.read_csv(root / "train.csv"), pd.read_csv(tmp_path / "folds" / "demo.csv")
    fold = train[["id"]].merge(folds, on="id")["fold"].to_numpy()
    out = tmp_path / "features" / "arc-knn"
    info = pd.read_json(out / "knn.json", typ="series")
    oof = train[["id"]].merge(pd.read_parquet(out / "oof.parquet"), on="id")
    for k in range(3):
        index = neighbours.Index.load(out / "index" / f"fold{k}.npz")
        assert set(index.ids) == set(train["id"][fold != k])  # exactly the rows fold k's model trained on
        assert not set(index.ids) & set(train["id"][fold == k])
        # ... and fold k's OOF rows are exactly what searching that index gives (with fold k's own threshold)
        run = ModelRun(tmp_path / "models" / "arc" / f"fold{k}" / "best.pt", "cpu")
        held = run.predict([root / "images" / f"{i}.png" for i in train["id"][fold == k]], embed=True)["embedding"]
        again = neighbours.predict(index, held, 20, 30.0, 5, 4, info["fold_thresholds"][str(k)])
        np.testing.assert_allclose(head_prediction(oof[fold == k], "arc-knn", "target"), again, atol=1e-5)
    n = len(train)
    assert sorted(tuned) == sorted([n - (fold == k).sum() for k in range(3)] + [n])  # nested, then all rows
    assert set(info["fold_thresholds"]) == {"0", "1", "2"} and info["test_threshold"] is not None
    assert (oof["fold"].to_numpy() == fold).all()
    test = pd.read_parquet(out / "test.parquet")
    accuracy = float((head_prediction(test, "arc-knn", "target").argmax(1) == truth).mean())
    print(f"\n[knn] test accuracy of the kNN set: {accuracy:.3f} (chance 0.2)")
    assert accuracy > 0.6
    assert (tmp_path / "features" / "arc-l2" / "test.parquet").exists()  # level 2 takes it as any feature set
    bundle = run_stage("kaggle", cfg)
    sub, frames = predict(bundle, root, device="cpu")
    np.testing.assert_allclose(frames["arc-knn"].drop(columns="id").to_numpy(), test.drop(columns="id").to_numpy(),
                               atol=1e-5)  # the bundle's indexes give the kNN test predictions
    assert (sub["target"].to_numpy() == head_prediction(test, "arc-knn", "target").argmax(1)).all()


def test_a_new_label_outside_the_classes_is_named(tmp_path):
    from pipeline.errors import InputError
    from pipeline.stages.knn import new_class

    root, _ = brightness_competition(tmp_path / "comp", "ordinal", n=20, n_test=4)
    base = [f"competition.root={root}", "competition.task=multiclass", "competition.metric=accuracy"]
    assert new_class(load_config(None, [*base, "knn.new_label=4"])) == 4
    for bad in ("9", "-1", "whale"):
        with pytest.raises(InputError, match=r"knn.new_label .* is not a class .*0\.\.4"):
            new_class(load_config(None, [*base, f"knn.new_label={bad}"]))


def test_make_stack_brings_a_knn_input_up_to_date_with_make_knn(tmp_path):
    import subprocess
    import sys

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "arc.yaml").write_text("name: arc\nmodel: {head: arcface}\n")
    (tmp_path / "configs" / "st.yaml").write_text("name: st\nstack: {experiments: [arc, arc-knn]}\n")
    out = subprocess.run([sys.executable, "-m", "pipeline", "inputs", "-c", "configs/st.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["configs/arc.yaml", "knn=configs/arc.yaml"]  # the Makefile runs `make knn` for the second


def test_with_repeats_each_repeat_has_its_own_oof_and_nested_thresholds(monkeypatch):
    from pipeline.stages.knn import _oof

    rng = np.random.default_rng(2)
    n, c = 60, 4
    matrix = np.column_stack([np.arange(n) % 3, 3 + rng.permutation(np.arange(n) % 3)])  # 2 repeats x 3 models
    y = rng.integers(0, c, n)
    oof_score = {m: rng.random(((matrix == m).any(axis=1).sum(), c)) for m in range(6)}
    seen = []
    monkeypatch.setattr(neighbours, "tune_threshold", lambda metric, yy, score, scale, new: seen.append(
        (len(yy), float(score[:, 0].sum()))) or 0.5)
    kc = load_config(None, ["knn.scale=30"]).knn  # no new_threshold: tuned
    oofs, thresholds, test_t = _oof(matrix, [[0, 1, 2], [3, 4, 5]], y, oof_score, c, kc, 3, get_metric("accuracy"))
    assert len(oofs) == 2 and set(thresholds) == set(range(6)) and test_t == 0.5
    for r in range(2):
        for m in range(3 * r, 3 * r + 3):
            mine = matrix[:, r] == m
            score = oof_score[m].copy()
            score[:, 3] = np.maximum(score[:, 3], 0.5)
            np.testing.assert_allclose(oofs[r][mine], neighbours.probabilities(score, 30.0))  # its owner's rows
    rest = [n - (matrix[:, 0] == m).sum() for m in range(3)], [n - (matrix[:, 1] == m).sum() for m in range(3, 6)]
    assert [s[0] for s in seen] == [*rest[0], n, *rest[1]]  # each model: its repeat's other rows; test: repeat 0


def test_a_knn_set_named_as_its_experiment_is_refused(tmp_path):
    from pipeline.errors import InputError
    from pipeline.stages import run_stage

    with pytest.raises(InputError, match="knn.name=arc is this experiment's own name.*overwrite its features"):
        run_stage("knn", load_config(None, [f"workdir={tmp_path}", "name=arc", "knn.name=arc"]))
