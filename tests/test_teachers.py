"""Pseudo-labelling and distillation: fold k never sees its own validation rows' information, a
teacher from another folds file is refused, the soft-target loss equals its formula."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.errors import ConfigError, InputError
from pipeline.stages import features as FE
from pipeline.stages import train as T
from pipeline.store.io import parquet_to, read_json
from pipeline.training import losses as L
from pipeline.training import teachers
from pipeline.training.models import Head
from tests.conftest import tiny_cfg


def test_distillation_loss_equals_its_formula():
    torch.manual_seed(0)
    z, p_t, y = torch.randn(5, 4), torch.softmax(torch.randn(5, 4), -1), torch.randint(0, 4, (5,))
    a, t = 0.3, 2.5
    q = torch.softmax(torch.log(p_t) / t, -1)
    kl = (q * (q.log() - torch.log_softmax(z / t, -1))).sum(-1)
    assert torch.allclose(L.distillation(z, p_t, t), t * t * kl, atol=1e-6)
    h = Head("y", ["y"], "multiclass", 4)
    tc = {"loss": "ce", "label_smoothing": 0.0, "focal_gamma": 2.0, "ohem": 1.0,
          "distill": {"alpha": a, "temperature": t}}
    crit = L.Criterion([h], tc, {"y"})
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    expected = ((1 - a) * ce + a * t * t * kl).mean()
    assert float(crit({"y": z}, {"y": y, "__teacher": p_t})) == pytest.approx(float(expected), rel=1e-5)
    w = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.0])  # pseudo rows weigh less; a weight 0 row counts for nothing
    expected_w = (((1 - a) * ce + a * t * t * kl) * w).sum() / w.sum()
    assert float(crit({"y": z}, {"y": y, "__teacher": p_t, "__weight": w})) == pytest.approx(float(expected_w), rel=1e-5)


@pytest.fixture
def teacher(workdir):
    cfg = tiny_cfg(workdir / "comp", "train.epochs=1", name="teach")
    T.run(cfg)
    FE.run(cfg)
    return cfg


def _student(root, *extra):
    return tiny_cfg(root, "train.epochs=1", *extra, name="student")


def test_pseudo_labels_of_fold_k_come_only_from_the_teachers_fold_k_model(teacher, monkeypatch):
    root = teacher["competition"]["root"]
    # make each fold model's test predictions recognisable: fold k predicts class k for every row
    path = "features/teach/test_folds.parquet"
    df, meta = pd.read_parquet(path), read_json("features/teach/meta.json")
    for k in range(3):
        m = df["fold"] == str(k)
        for j in range(3):
            df.loc[m, f"teach__target__{j}__mean"] = 0.98 if j == k else 0.01
    parquet_to(path, df, {"stage_key": meta["stage_key"], "folds_hash": meta["folds_hash"]})
    cfg = _student(root, "train.pseudo.source=teach", "train.pseudo.threshold=0.9")
    for k in range(3):
        ids, probs = teachers.pseudo_labels(cfg, k, meta["folds_hash"], "id")
        assert len(ids) == len(pd.read_csv(f"{root}/test.csv")) and (probs.argmax(1) == k).all()
    seen = {}  # what each fold's trainer actually trains on (through the trainer, not pseudo_labels alone)
    real = teachers.extend

    def spy(cfg_, heads, fold, *a, **k):
        paths, ys = real(cfg_, heads, fold, *a, **k)
        seen[fold] = np.asarray(ys["target"])
        return paths, ys

    monkeypatch.setattr(teachers, "extend", spy)
    summary = T.run(cfg)  # a student trains with them (hard labels, weight 1)
    assert set(summary["folds"]) == {"fold0", "fold1", "fold2"}
    n_test = len(pd.read_csv(f"{root}/test.csv"))
    assert sorted(seen) == [0, 1, 2] and all((seen[k][-n_test:] == k).all() for k in range(3))
    monkeypatch.setattr(teachers, "extend", real)
    # below the threshold nothing is added
    ids, _ = teachers.pseudo_labels(_student(root, "train.pseudo.source=teach", "train.pseudo.threshold=0.99"),
                                    0, meta["folds_hash"], "id")
    assert len(ids) == 0
    # the teacher retrained with another config: its features are stale until `make features` runs again
    T.run(tiny_cfg(root, "train.epochs=2", name="teach"))
    with pytest.raises(InputError, match="older fold-0 model"):
        teachers.pseudo_labels(cfg, 0, meta["folds_hash"], "id")
    with pytest.raises(InputError, match="older fold-. model"):  # the all-data student: the fold mean's models
        teachers.pseudo_labels(cfg, "full", meta["folds_hash"], "id")
    FE.run(tiny_cfg(root, "train.epochs=2", name="teach"))
    teachers.pseudo_labels(cfg, 0, meta["folds_hash"], "id")  # current again: accepted


def test_distillation_targets_of_fold_k_come_from_the_teachers_fold_k_model(teacher, monkeypatch):
    root = teacher["competition"]["root"]
    cfg = _student(root, "train.distill.teacher=teach")
    from pipeline.competition.tables import fold_of, load_folds, load_train

    train_df = load_train(cfg)
    folds_df, folds_hash = load_folds(cfg)
    fold = fold_of(cfg, train_df, folds_df)
    used = []
    real = teachers._predict
    monkeypatch.setattr(teachers, "_predict", lambda path, *a: used.append(path) or real(path, *a))
    for k in range(3):
        rows = np.flatnonzero(fold != k)
        probs = teachers.distill_targets(cfg, k, folds_hash, train_df, rows, "cpu")
        assert probs.shape == (len(rows), 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
        assert used[-1].parent.name == f"fold{k}"  # the one teacher model that never saw fold k's rows
        meta = read_json(used[-1].parent / "meta.json")
        assert meta["result"]["rows_valid"] == int((fold == k).sum())  # it held fold k out
    # and the student trains with them, each fold taught by the teacher's model of that fold alone;
    # its leaderboard row is not marked leaky
    used.clear()
    T.run(cfg)
    assert [p.parent.name for p in used] == ["fold0", "fold1", "fold2"]
    import sqlite3

    note = sqlite3.connect("submissions/leaderboard.db").execute(
        "SELECT note FROM runs WHERE experiment='student' AND stage='train' ORDER BY id DESC").fetchone()[0]
    assert "LEAKY" not in note


def test_the_leaky_oof_variant_needs_allow_leak_and_is_marked(teacher, monkeypatch):
    root = teacher["competition"]["root"]
    cfg = _student(root, "train.distill.teacher=teach", "train.distill.allow_leak=true")
    seen = {}  # what each fold's trainer distils from: the teacher's OOF rows (not the fold-k model)
    real = teachers.extend

    def spy(cfg_, heads, fold, *a, **k):
        paths, ys = real(cfg_, heads, fold, *a, **k)
        seen[fold] = (list(paths), np.asarray(ys["__teacher"]))
        return paths, ys

    monkeypatch.setattr(teachers, "extend", spy)
    T.run(cfg)
    monkeypatch.setattr(teachers, "extend", real)
    oof = pd.read_parquet("features/teach/oof.parquet").set_index("id")
    cols = [f"teach__target__{j}__mean" for j in range(3)]
    for k, (paths, got) in seen.items():
        ids = [Path(p).stem for p in paths]
        assert np.allclose(got, oof.loc[ids, cols].to_numpy(), atol=1e-6), k
    import json

    for m in Path("models/student").glob("fold*/meta.json"):  # models trained before the mark was recorded
        m.write_text(json.dumps({k: v for k, v in read_json(m).items() if k != "leak"}))
    FE.run(cfg)  # its config still says allow_leak: marked
    from pipeline.store import leaderboard as LB

    table = LB.table("submissions/leaderboard.db")
    assert "student (LEAKY)" in set(table["experiment"]) and "teach" in set(table["experiment"])


def test_the_leak_mark_follows_the_artifacts_into_everything_built_on_them(teacher):
    """The mark is read from the models' and features' metadata, not from the config at hand: a features run
    without the overrides, level 2, post-processing and a student of the leaky student are all marked."""
    import sqlite3

    from pipeline.stages import postprocess as PP
    from pipeline.stages import stack as S
    from pipeline.store import leaderboard as LB

    root = teacher["competition"]["root"]
    leaky = _student(root, "train.distill.teacher=teach", "train.distill.allow_leak=true")
    T.run(leaky)
    with pytest.raises(InputError, match="out of date"):  # another config cannot featurise these models at all
        FE.run(_student(root))
    FE.run(leaky)
    assert read_json("features/student/meta.json")["leak"].startswith("LEAKY")
    S.run(tiny_cfg(root, "stack.experiments=[teach, student]", "stack.model=weighted", "stack.name=l2"))
    PP.run(tiny_cfg(root, "postprocess.source=teach", "postprocess.blend_with=student", "postprocess.name=teach-pp"))
    grandchild = tiny_cfg(root, "train.epochs=1", "train.pseudo.source=student", "train.pseudo.threshold=0.5",
                          name="grandchild")
    T.run(grandchild)
    FE.run(grandchild)
    con = sqlite3.connect("submissions/leaderboard.db")
    notes = dict(con.execute("SELECT experiment || '/' || stage, note FROM runs ORDER BY id"))
    for row in ("student/features", "l2/stack", "teach-pp/stack", "grandchild/train", "grandchild/features"):
        assert "LEAKY" in notes[row], row
    assert "LEAKY" not in notes["teach/features"]
    assert read_json("features/l2/meta.json")["leak"] and read_json("features/grandchild/meta.json")["leak"]
    marked = {e for e in LB.table("submissions/leaderboard.db")["experiment"] if e.endswith("(LEAKY)")}
    assert marked == {"student (LEAKY)", "l2 (LEAKY)", "teach-pp (LEAKY)", "grandchild (LEAKY)"}


def test_a_teacher_from_another_folds_file_is_refused(teacher):
    root = teacher["competition"]["root"]
    meta = read_json("features/teach/meta.json")
    import json
    from pathlib import Path

    Path("features/teach/meta.json").write_text(json.dumps({**meta, "folds_hash": "0123456789ab"}))
    with pytest.raises(InputError, match="another|folds file hash"):
        T.run(_student(root, "train.pseudo.source=teach"))
    import shutil

    # fold folders swapped: fold 0's folder holds fold 1's model, which trained on fold 0's validation rows
    shutil.copy("models/teach/fold1/best.pt", "models/teach/fold0/best.pt")
    with pytest.raises(InputError, match="mixed up"):
        T.run(_student(root, "train.distill.teacher=teach"))
    fold_meta = read_json("models/teach/fold0/meta.json")
    Path("models/teach/fold0/meta.json").write_text(json.dumps({**fold_meta, "folds_hash": "0123456789ab"}))
    with pytest.raises(InputError, match="folds file hash"):
        T.run(_student(root, "train.distill.teacher=teach"))


def test_teacher_rules_refuse_unsuitable_setups(workdir):
    from pipeline.__main__ import main

    cfg = tiny_cfg(workdir / "comp", "train.pseudo.source=none-yet", name="s")
    with pytest.raises(InputError, match="make features"):
        T.run(cfg)
    with pytest.raises(ConfigError, match="one multiclass or multilabel target head"):
        T.run(tiny_cfg(workdir / "comp", "train.distill.teacher=x", "competition.aux_targets=[tab]", name="s2"))
    (workdir / "me.yaml").write_text("name: me\ntrain: {pseudo: {source: me}}\n")
    assert main(["inputs", "--for", "train", "-c", "me.yaml"]) == 2  # a round cannot be its own teacher
