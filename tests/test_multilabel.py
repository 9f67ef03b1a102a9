"""Label sets (``competition.task: multilabel``): both ways a competition writes them, the metrics, the
asymmetric loss, folds stratified over labels with groups, per-label thresholds, level 2 per label, and the
whole chain with the bundle. (The space-separated form through the offline notebook: tests/test_kaggle.py.)"""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.config.loading import load_config
from pipeline.errors import InputError
from pipeline.metrics import get_metric

LABELS = ("top", "left", "centre")


def label_set_competition(root, form: str, n: int = 180, n_test: int = 40, seed: int = 0):
    """Grey 16 px images; each label brightens its own region (the top half, the left half, a centre square).
    ``form``: ``columns`` (one 0/1 column per label) or ``tags`` (one column of space-separated labels)."""
    rng = np.random.default_rng(seed)
    Y = (rng.random((n + n_test, 3)) < [0.5, 0.35, 0.2]).astype(int)
    (root / "images").mkdir(parents=True)
    ids = [f"r{i}" for i in range(n)] + [f"t{i}" for i in range(n_test)]
    for i, y in zip(ids, Y):
        arr = rng.normal(60, 10, (16, 16))
        arr[:8] += 110 * y[0]
        arr[:, :8] += 110 * y[1]
        arr[5:11, 5:11] += 120 * y[2]
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").save(root / "images" / f"{i}.png")

    def table(rows, labels):
        if form == "columns":
            return pd.DataFrame({"id": rows, **{c: labels[:, j] for j, c in enumerate(LABELS)}})
        return pd.DataFrame({"id": rows, "tags": [" ".join(c for c, x in zip(LABELS, y) if x) for y in labels]})

    table(ids[:n], Y[:n]).assign(grp=rng.integers(0, 20, n)).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": ids[n:]}).to_csv(root / "test.csv", index=False)
    sample = table(ids[n:], np.zeros((n_test, 3), int))
    if form == "tags":
        sample["tags"] = "top"  # a placeholder label, as Kaggle's samples have
    sample.to_csv(root / "sample_submission.csv", index=False)
    table(ids[n:], Y[n:]).assign(Usage=["Public", "Private"] * (n_test // 2)).to_csv(root / "solution.csv", index=False)
    return root, Y[n:]


def overrides(tmp_path, root, form: str, metric: str) -> list[str]:
    target = "[top,left,centre]" if form == "columns" else "tags"
    return [f"workdir={tmp_path}", f"competition.root={root}", "competition.task=multilabel",
            f"competition.target={target}", f"competition.metric={metric}", "competition.group=grp",
            "data.in_chans=1", "data.image_size=16", "folds.n_splits=3", "model.backbone=test_resnet",
            "train.epochs=5", "train.batch_size=16", "train.lr=0.005", "features.batch_size=64",
            "postprocess.threshold=true", "name=ml"]


# ------------------------------------------------------------------------- the two forms
def test_a_space_separated_column_is_a_label_matrix_and_submit_writes_it_back(tmp_path):
    from pipeline.competition.submission import to_submission
    from pipeline.competition.tables import class_labels, label_matrix, load_train, truth

    root, _ = label_set_competition(tmp_path / "comp", "tags", n=30, n_test=6)
    cfg = load_config(None, [*overrides(tmp_path, root, "tags", "micro_f1")[:6], "data.in_chans=1"])
    train = load_train(cfg)
    raw = pd.read_csv(root / "train.csv")
    assert class_labels(cfg) == ["centre", "left", "top"]  # sorted: the order of the model's outputs
    y = truth(cfg, train)
    assert y.shape == (30, 3)
    for row, cell in zip(y, raw["tags"].fillna("")):
        assert set(np.asarray(class_labels(cfg))[row.astype(bool)]) == set(cell.split())
    sample = pd.read_csv(root / "sample_submission.csv")
    p = np.array([[0.9, 0.2, 0.7], [0.1, 0.2, 0.3], [0.6, 0.6, 0.6], [0.1, 0.9, 0.1], [0.5, 0.1, 0.1], [0, 0, 1.0]])
    sub = to_submission(cfg, p, sample["id"], sample, class_labels(cfg))
    assert sub["tags"].tolist() == ["centre top", "", "centre left top", "left", "centre", "top"]
    np.testing.assert_array_equal(label_matrix(cfg, sub, "sub"), (p >= 0.5).astype(float))  # and back


def test_label_columns_submit_yes_no_for_f1_and_probabilities_for_ranking_metrics(tmp_path):
    from pipeline.competition.submission import submits_integers, to_submission, validate
    from pipeline.competition.tables import class_labels

    root, _ = label_set_competition(tmp_path / "comp", "columns", n=30, n_test=4)
    sample = pd.read_csv(root / "sample_submission.csv")[["id", "centre", "top", "left"]]  # any column order
    p = np.array([[0.9, 0.2, 0.7], [0.1, 0.6, 0.3], [0.6, 0.6, 0.6], [0.1, 0.9, 0.1]])  # top, left, centre
    for metric, want in (("micro_f1", (p >= 0.5).astype(int)), ("mean_auc", p)):
        cfg = load_config(None, overrides(tmp_path, root, "columns", metric)[:6])
        sub = to_submission(cfg, p, sample["id"], sample, class_labels(cfg))
        validate(sub, sample, "id", integers=submits_integers(cfg, sample))
        np.testing.assert_allclose(sub[list(LABELS)].to_numpy(), want)  # matched by name, not position
        assert all(pd.api.types.is_integer_dtype(sub[c]) for c in LABELS) == (metric == "micro_f1")


@pytest.mark.parametrize("bad, message", [
    ({"top": [0, 2, 1, 0]}, "must hold 0 or 1"),
    ({"left": [1, 1, 1, 1]}, "present in all 4 rows"),
])
def test_a_bad_label_column_is_named(tmp_path, bad, message):
    from pipeline.competition.tables import load_train

    root, _ = label_set_competition(tmp_path / "comp", "columns", n=4, n_test=2)
    train = pd.read_csv(root / "train.csv")
    train.assign(**bad).to_csv(root / "train.csv", index=False)
    cfg = load_config(None, overrides(tmp_path, root, "columns", "micro_f1")[:6])
    with pytest.raises(InputError, match=f"train.csv: label .*'{next(iter(bad))}'.*{message}"):
        load_train(cfg, check_images=False)
    one = load_config(None, [*overrides(tmp_path, root, "columns", "micro_f1")[:5], "competition.target=[top]"])
    with pytest.raises(InputError, match="at least 2 labels.*competition.task=binary"):
        load_train(one, check_images=False)


# ------------------------------------------------------------------------- metrics and the loss
def test_the_label_set_metrics_are_the_usual_ones():
    from sklearn.metrics import average_precision_score, f1_score, log_loss, roc_auc_score

    rng = np.random.default_rng(0)
    y = (rng.random((200, 4)) < [0.5, 0.3, 0.1, 0.05]).astype(int)
    p = np.clip(y * 0.35 + rng.random((200, 4)) * 0.65, 0, 1)
    on = (p >= 0.5).astype(int)
    assert get_metric("micro_f1")(y, p) == pytest.approx(f1_score(y, on, average="micro"))
    assert get_metric("macro_f1")(y, p) == pytest.approx(f1_score(y, on, average="macro", zero_division=0))
    assert get_metric("mean_auc")(y, p) == pytest.approx(roc_auc_score(y, p, average="macro"))
    assert get_metric("map")(y, p) == pytest.approx(average_precision_score(y, p, average="macro"))
    assert get_metric("logloss")(y, p) == pytest.approx(np.mean([log_loss(y[:, j], p[:, j]) for j in range(4)]))
    assert get_metric("macro_f1")(y[:, 0], np.column_stack([1 - p[:, 0], p[:, 0]])) == pytest.approx(
        f1_score(y[:, 0], on[:, 0], average="macro"))  # classes: as before


def test_the_asymmetric_loss_fades_easy_absent_labels_and_keeps_present_ones():
    from pipeline.training.losses import LOSSES
    from pipeline.training.models import Head

    head = Head("labels", ["a", "b"], "multilabel", 2)
    opts = {"label_smoothing": 0.0, "asl_gamma_neg": 4.0, "asl_clip": 0.05}
    bce, asl = LOSSES["multilabel"]["bce"], LOSSES["multilabel"]["asl"]
    logits, y = torch.tensor([[2.0, -1.0], [-1.0, 0.5]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    plain = {**opts, "asl_gamma_neg": 0.0, "asl_clip": 0.0}
    torch.testing.assert_close(asl(logits, y, head, plain), bce(logits, y, head, plain))  # gamma 0, no clip: BCE
    # a present label alone costs the same; an easy absent one (p = 0.27) much less than under BCE
    present, absent = torch.tensor([[2.0, -30.0]]), torch.tensor([[30.0, -1.0]])
    yy = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(asl(present, yy, head, opts), bce(present, yy, head, opts), atol=1e-6, rtol=0)
    assert asl(absent, yy, head, opts) < 0.05 * bce(absent, yy, head, opts)
    below = torch.tensor([[30.0, -4.0]])  # p = 0.018 < the clip: costs nothing at all
    assert asl(below, yy, head, opts).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------- folds
def test_label_set_folds_keep_groups_whole_and_every_label_in_every_fold():
    from sklearn.model_selection import GroupKFold

    from pipeline.stages.folds import label_set_split, stratification_error

    rng = np.random.default_rng(1)
    groups = rng.integers(0, 120, 600)
    Y = (rng.random((600, 6)) < [0.5, 0.3, 0.15, 0.06, 0.03, 0.02]).astype(int)
    ours = label_set_split(Y, groups, 5, seed=0)
    assert all(len(set(ours[groups == g])) == 1 for g in np.unique(groups))  # groups whole
    assert (np.bincount(ours, minlength=5) > 0).all()
    positives = np.array([[Y[ours == k, j].sum() for j in range(6)] for k in range(5)])
    assert (positives > 0).all()  # even the rarest label (12 rows) is in every fold
    plain = np.empty(600, int)
    for k, (_, va) in enumerate(GroupKFold(5).split(Y, groups=groups)):
        plain[va] = k
    err, err_plain = stratification_error(ours, Y), stratification_error(plain, Y)
    print(f"\n[label folds] largest label-share gap: iterative {err:.2f} pp, GroupKFold {err_plain:.2f} pp")
    assert err < 0.5 * err_plain
    sizes = np.bincount(ours)
    assert sizes.max() - sizes.min() < 0.2 * sizes.mean()


# ------------------------------------------------------------------------- thresholds and level 2
def test_per_label_thresholds_are_tuned_on_oof_with_their_nested_gain():
    from pipeline.level2.rules import apply_rules, honest_gain

    rng = np.random.default_rng(2)
    y = (rng.random((400, 3)) < [0.4, 0.2, 0.3]).astype(int)
    scale = np.array([1.0, 0.5, 0.3])  # labels 1 and 2 are under-confident: their best thresholds are low
    p = np.clip((y * 0.6 + rng.random((400, 3)) * 0.4) * scale, 0, 1)
    pcfg = load_config(None, ["postprocess.threshold=true"])["postprocess"]
    metric = get_metric("macro_f1")
    res, nested = honest_gain(pcfg, "multilabel", metric, y, p, np.arange(400) % 4)
    t = np.array(res["params"]["label_thresholds"])
    assert 0.3 <= t[0] <= 0.7 and t[1] < 0.4 and t[2] < 0.25, t
    assert res["nested_gain"] > 0.2 and res["in_sample_gain"] >= res["nested_gain"] - 1e-9
    assert metric(y, apply_rules(res["params"], "multilabel", p)) == pytest.approx(res["in_sample"])
    assert nested.shape == p.shape


def test_level_2_fits_each_label_and_its_saved_models_redo_the_test_predictions(tmp_path):
    from pipeline.level2.models import LEVEL2_MODELS, Level2Data, predict_saved, stage_models
    from pipeline.store.artifacts import ArtifactGroup

    rng = np.random.default_rng(3)
    y = (rng.random((300, 3)) < 0.4).astype(int)
    X = pd.DataFrame(np.clip(y + rng.normal(0, 0.6, y.shape), -1, 2), columns=["a__l__0__mean", "a__l__1__mean",
                                                                                "a__l__2__mean"])
    T = X.iloc[:50].reset_index(drop=True)
    scfg = load_config(None, ["stack.model=lgbm"])["stack"]
    d = Level2Data(X, T, y, np.arange(300) % 3, "multilabel", 3, ["a"], [], [], scfg, 0, get_metric("mean_auc"))
    result = LEVEL2_MODELS["lgbm"](d)
    assert result.oof.shape == (300, 3) and result.test.shape == (50, 3)
    assert get_metric("mean_auc")(y, result.oof) > 0.8
    per_label = [np.corrcoef(result.oof[:, j], X.iloc[:, j])[0, 1] for j in range(3)]
    assert min(per_label) > 0.7  # each label's column follows its own input
    with ArtifactGroup(tmp_path / "meta.json") as group:
        stage_models(group, tmp_path / "models", d, result)
        group.commit({})
    np.testing.assert_allclose(predict_saved(tmp_path / "models", T), result.test, atol=1e-9)


# ------------------------------------------------------------------------- the whole chain
def test_a_label_set_competition_runs_the_whole_chain_and_the_bundle(tmp_path, monkeypatch):
    from pipeline.kaggle.inference import predict
    from pipeline.stages import run_stage

    monkeypatch.chdir(tmp_path)
    root, truth = label_set_competition(tmp_path / "comp", "columns")
    over = overrides(tmp_path, root, "columns", "mean_auc")
    cfg = load_config(None, [*over, "train.loss=asl"])
    for stage in ("folds", "train", "features", "stack", "postprocess", "submit"):
        run_stage(stage, cfg)
    report = (tmp_path / "folds" / "demo.report.txt").read_text()
    assert "top %" in report and "label-share deviation" in report
    sub = pd.read_csv(tmp_path / "submissions" / "ml-l2-pp.csv")
    assert list(sub.columns) == ["id", *LABELS]
    score = get_metric("mean_auc")(truth, sub[list(LABELS)].to_numpy())
    print(f"\n[multilabel] mean column-wise AUC of the submission on solution.csv: {score:.4f} (chance 0.5)")
    assert score > 0.85
    assert sub[list(LABELS)].stack().between(0, 1).all() and sub["top"].nunique() > 2  # probabilities (AUC)
    with pytest.raises(InputError, match="force_from forces one class.*label set"):  # a label set has no one class
        run_stage("postprocess", load_config(None, [*over, "postprocess.force_from={experiment: ml}", "postprocess.name=f"]))
    bundle = run_stage("kaggle", load_config(None, [*over, "train.loss=asl", "kaggle.source=ml-l2-pp"]))
    frame, _ = predict(bundle, root, device="cpu")
    np.testing.assert_allclose(frame[list(LABELS)].to_numpy(), sub[list(LABELS)].to_numpy(), atol=1e-3)


def test_the_readme_task_table_is_the_task_registry():
    """Every task kind has its README row, and the row's losses, metrics and rules are the registry's."""
    import re
    from pathlib import Path

    from pipeline.tasks import TASKS
    from pipeline.training.losses import LOSSES

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("| task | target |")
    table = text[start:text.index("\n\n", start)]
    rows = {m.group(1): [c.strip() for c in m.group(2).split("|")]
            for m in re.finditer(r"^\| `(\w+)` \|(.*)\|$", table, re.M)}
    assert set(rows) >= set(TASKS), sorted(set(TASKS) - set(rows))

    def names(cell):
        return {w.strip() for w in cell.split(",")}

    for name, task in TASKS.items():
        target, head, losses, metrics, rules, *_ = rows[name]
        assert names(losses) == set(LOSSES[task.head]), name
        assert names(metrics) == set(task.metrics), name
        assert names(rules) == set(task.rules), name


def test_f1_thresholds_from_counts_are_the_full_rescoring_ones():
    from pipeline.level2.rules import label_thresholds
    from pipeline.metrics import Metric

    rng = np.random.default_rng(4)
    y = (rng.random((300, 12)) < rng.uniform(0.02, 0.5, 12)).astype(int)
    p = np.clip(y * rng.uniform(0.1, 0.6, 12) + rng.random((300, 12)) * 0.5, 0, 1)
    for name in ("micro_f1", "macro_f1"):
        fast = label_thresholds(get_metric(name), y, p)
        slow = label_thresholds(Metric("rescored", get_metric(name).fn, True), y, p)  # the generic path
        np.testing.assert_array_equal(fast, slow)
    np.testing.assert_array_equal(label_thresholds(get_metric("mean_auc"), y, p), 0.5)  # ranks: nothing to tune


def test_make_folds_routes_a_label_set_to_the_label_stratification(tmp_path):
    from pipeline.competition.tables import load_train, truth
    from pipeline.stages.folds import label_set_split, make_folds

    root, _ = label_set_competition(tmp_path / "comp", "tags", n=90, n_test=4)
    cfg = load_config(None, overrides(tmp_path, root, "tags", "micro_f1"))
    train = load_train(cfg, check_images=False)
    want = label_set_split(truth(cfg, train), train["grp"].astype(str).to_numpy(), 3, cfg["folds"]["seed"])
    np.testing.assert_array_equal(make_folds(cfg, train), want)


def test_numeric_labels_in_one_column_and_a_numeric_sample_placeholder(tmp_path):
    from pipeline.competition.submission import text_columns, to_submission, validate
    from pipeline.competition.tables import class_labels, label_matrix, load_train, truth

    root = tmp_path / "comp"
    root.mkdir()
    pd.DataFrame({"id": ["a", "b", "c", "d"], "Target": ["1", "2", "", "10 2"]}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": ["t0", "t1"], "Target": [0, 0]}).to_csv(root / "sample_submission.csv", index=False)
    pd.DataFrame({"id": ["t0", "t1"]}).to_csv(root / "test.csv", index=False)
    cfg = load_config(None, [f"competition.root={root}", "competition.task=multilabel", "competition.target=Target",
                             "competition.metric=macro_f1", "competition.check_images=false"])
    assert class_labels(cfg) == ["1", "2", "10"]  # numeric order
    np.testing.assert_array_equal(truth(cfg, load_train(cfg, check_images=False)),
                                  [[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 1, 1]])
    np.testing.assert_array_equal(label_matrix(cfg, pd.DataFrame({"Target": [2.0, 1.0]}), "x"), [[0, 1, 0], [1, 0, 0]])
    sample = pd.read_csv(root / "sample_submission.csv")
    sub = to_submission(cfg, np.array([[0.9, 0.1, 0.8], [0.1, 0.1, 0.1]]), sample["id"], sample, class_labels(cfg))
    validate(sub, sample, "id", text=text_columns(cfg))  # the sample's 0s do not make the labels numbers
    assert sub["Target"].tolist() == ["1 10", ""]


def test_a_probability_metric_with_one_label_column_is_refused_and_the_fold_mean_sums_over_labels():
    from pipeline.errors import ConfigError
    from pipeline.metrics import ambiguity, squared_error

    with pytest.raises(ConfigError, match="scores a probability per label.*0/1 columns"):
        load_config(None, ["competition.task=multilabel", "competition.target=tags", "competition.metric=mean_auc"])
    rng = np.random.default_rng(5)
    y = (rng.random((50, 4)) < 0.3).astype(int)
    models = [rng.random((50, 4)) for _ in range(3)]
    single = np.mean([squared_error(y, m, False) for m in models])
    assert single - ambiguity(models) == pytest.approx(squared_error(y, np.mean(models, axis=0), False))


def test_the_asymmetric_loss_without_a_clip_still_pushes_a_confident_wrong_label():
    from pipeline.training.losses import LOSSES
    from pipeline.training.models import Head

    head = Head("labels", ["a", "b"], "multilabel", 2)
    logits = torch.tensor([[30.0, 0.0]], requires_grad=True)  # label a: absent, yet p = 1 - 1e-13
    LOSSES["multilabel"]["asl"](logits, torch.tensor([[0.0, 1.0]]), head,
                                {"label_smoothing": 0.0, "asl_gamma_neg": 0.0, "asl_clip": 0.0}).sum().backward()
    assert logits.grad[0, 0] > 0.4  # d/dz of -log(1 - sigmoid(z)) / 2 labels -> 0.5


def test_level_2_per_label_refits_each_label_with_its_own_trees_and_a_linear_fit_survives_a_one_fold_label():
    from pipeline.level2.models import LEVEL2_MODELS, Level2Data

    rng = np.random.default_rng(6)
    y = (rng.random((300, 3)) < 0.4).astype(int)
    fold = np.arange(300) % 3
    y[:, 2] = 0
    y[np.flatnonzero(fold == 0)[:5], 2] = 1  # a rare label, only in fold 0: folds 1 and 2 train without it
    noise = [0.2, 1.5, 1.0]  # label 0 is easy (few trees), label 1 is hard
    X = pd.DataFrame(np.column_stack([y[:, j] + rng.normal(0, noise[j], 300) for j in range(3)]),
                     columns=[f"a__l__{j}__mean" for j in range(3)])
    refit = load_config(None, ["stack.model=lgbm", "stack.test_mode=refit"])["stack"]
    d = Level2Data(X, X.iloc[:20], y, fold, "multilabel", 3, ["a"], [], [], refit, 0, get_metric("micro_f1"))
    result = LEVEL2_MODELS["lgbm"](d)
    want = [max(1, int(np.mean([result.models[f"fold{k}"].iterations[j] for k in range(3)]))) for j in range(3)]
    assert result.models["refit"].iterations == want and len(set(want)) > 1, want
    linear = LEVEL2_MODELS["linear"](Level2Data(X, X.iloc[:20], y, fold, "multilabel", 3, ["a"], [], [],
                                                load_config(None, ["stack.model=linear"])["stack"], 0, None))
    assert linear.oof.shape == (300, 3) and (linear.oof[fold == 0, 2] == 0).all()  # trained on folds 1, 2: never


def test_a_label_set_takes_pseudo_labels_and_distillation(tmp_path, monkeypatch):
    from pipeline.competition.tables import load_train
    from pipeline.stages import run_stage
    from pipeline.store.paths import head_prediction
    from pipeline.training import teachers
    from pipeline.training.losses import distillation
    from pipeline.training.models import heads_for

    monkeypatch.chdir(tmp_path)
    root, _ = label_set_competition(tmp_path / "comp", "columns", n=120, n_test=40)
    over = overrides(tmp_path, root, "columns", "micro_f1")
    for stage in ("folds", "train", "features"):
        run_stage(stage, load_config(None, over))
    student = load_config(None, [*over, "name=ml-r1", "train.pseudo.source=ml", "train.pseudo.threshold=0.9",
                                 "train.pseudo.soft=false", "train.epochs=2"])
    train = load_train(student, check_images=False)
    folds = pd.read_csv(tmp_path / "folds" / "demo.csv")
    rows = np.flatnonzero(train[["id"]].merge(folds, on="id")["fold"].to_numpy() != 0)
    heads = heads_for(student, train)
    ys = {"labels": train[list(LABELS)].to_numpy(np.float32)[rows]}
    folds_hash = pd.read_json(tmp_path / "features" / "ml" / "meta.json", typ="series")["folds_hash"]
    paths, out = teachers.extend(student, heads, 0, folds_hash, train, rows, [None] * len(rows), ys, "cpu")
    mine = pd.read_parquet(tmp_path / "features" / "ml" / "test_folds.parquet").query("fold == '0'")
    probs = head_prediction(mine, "ml", "labels")
    sure = np.maximum(probs, 1 - probs).min(axis=1) >= 0.9  # every label's yes or no is confident
    assert 0 < sure.sum() < len(sure)
    assert [p.name for p in paths[len(rows):]] == [f"{i}.png" for i in mine["id"][sure]]
    np.testing.assert_array_equal(out["labels"][len(rows):], (probs[sure] >= 0.5).astype(np.float32))
    assert (out["__weight"][len(rows):] == student["train"]["pseudo"]["weight"]).all()
    run_stage("train", student)  # the round trains
    # distillation per label: a binary KL per label, zero where the student already says what the teacher does
    p = torch.tensor([[0.9, 0.2, 0.5]])
    same = distillation(torch.log(p / (1 - p)), p, 2.0, per_label=True)
    assert same.abs().max() < 1e-5
    z = torch.zeros(1, 3)
    kl = (p * torch.log(p / 0.5) + (1 - p) * torch.log((1 - p) / 0.5)).mean()
    torch.testing.assert_close(distillation(z, p, 1.0, per_label=True)[0], kl)


def test_the_asymmetric_loss_options_change_the_train_key_only_when_it_is_the_loss(tmp_path):
    from pipeline.training.train_key import stage_key

    base = [f"competition.root={tmp_path}", "competition.task=multilabel", "competition.target=[a,b]",
            "competition.metric=micro_f1"]

    def key(*extra):
        return stage_key(load_config(None, [*base, *extra]), "f", "t")

    assert key("train.asl_clip=0.2") == key()  # bce: the options are not used
    assert key("train.loss=asl", "train.asl_clip=0.2") != key("train.loss=asl") != key()


def test_labels_named_like_missing_values_stay_labels_and_commas_are_refused(tmp_path):
    from pipeline.competition.tables import class_labels, load_train, truth

    root = tmp_path / "comp"
    root.mkdir()
    pd.DataFrame({"id": ["t0"]}).to_csv(root / "test.csv", index=False)
    (root / "train.csv").write_text("id,tags\na,None\nb,NA haze\nc,\nd,haze\n")
    cfg = load_config(None, [f"competition.root={root}", "competition.task=multilabel", "competition.target=tags",
                             "competition.metric=micro_f1", "competition.check_images=false"])
    assert class_labels(cfg) == ["NA", "None", "haze"]
    np.testing.assert_array_equal(truth(cfg, load_train(cfg, check_images=False)),
                                  [[0, 1, 0], [1, 0, 1], [0, 0, 0], [0, 0, 1]])
    (root / "train.csv").write_text("id,tags\na,road\nb,\"road,river\"\n")
    with pytest.raises(InputError, match="label 'road,river' at line 3 holds a separator.*'a b', not 'a,b'"):
        load_train(cfg, check_images=False)


def test_postprocess_says_when_a_switch_does_not_apply_and_when_the_rules_lose():
    from pipeline.stages.postprocess import _warnings

    res = {"nested_gain": -0.02, "nested": 0.80, "base": 0.82}
    cfg = load_config(None, ["competition.task=multilabel", "competition.target=[a,b]", "competition.metric=mean_auc",
                             "postprocess.class_scale=true", "postprocess.threshold=true"])
    text = "\n".join(_warnings(cfg, res, "ml", get_metric("mean_auc")))
    assert "postprocess.class_scale does not apply to task multilabel" in text
    assert "threshold" not in text.split("class_scale")[0]  # (threshold applies: per label)
    assert "mean_auc scores each label's ranking" in text
    assert "lose on nested CV (0.8000 against 0.8200 for ml alone)" in text and "submit.source=ml" in text
    assert _warnings(cfg, {**res, "nested_gain": 0.01}, "ml", get_metric("micro_f1"))[-1].startswith(
        "[postprocess] warning: postprocess.class_scale")  # a gain: no WARNING
