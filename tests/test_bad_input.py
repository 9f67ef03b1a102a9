"""Every user mistake ends in one `error:` line naming the file, key or id, exit code 2, no traceback.

One case per row of the README table "Bad input and what you see" (the folds-level cases also have
their own tests in test_folds.py; here they go through the command line).
"""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipeline.__main__ import main
from tests.conftest import CFG, make_competition

BASE = ["competition.root=comp", "competition.group=grp", "data.in_chans=1", "data.image_size=16",
        "model.backbone=test_resnet", "train.epochs=1", "train.batch_size=16", "folds.n_splits=3", "name=tiny"]


def _comp(tmp_path):
    return make_competition(tmp_path / "comp", n=60, n_groups=9, n_classes=3, size=16)


def _drop_train_row_column(root):
    df = pd.read_csv(root / "train.csv")
    df.drop(columns=["grp"]).to_csv(root / "train.csv", index=False)


def _duplicate_id(root):
    df = pd.read_csv(root / "train.csv")
    df.loc[3, "id"] = df.loc[1, "id"]
    df.to_csv(root / "train.csv", index=False)


def _nan_target(root):
    df = pd.read_csv(root / "train.csv")
    df.loc[4, "target"] = np.nan
    df.to_csv(root / "train.csv", index=False)


def _rare_class(root):
    df = pd.read_csv(root / "train.csv")
    df.loc[df.index[:1], "target"] = 7
    df.to_csv(root / "train.csv", index=False)


def _missing_test_image(root):
    (root / "images" / "t00003.png").unlink()


def _broken_train_image(root):
    (root / "images" / "r00005.png").write_bytes(b"not a png at all")


def _broken_test_image(root):
    (root / "images" / "t00002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")


# (case, how the competition is damaged, command line, what the error line must name)
CASES = [
    ("missing train file", lambda r: (r / "train.csv").unlink(), ["folds"], ["train.csv", "not found"]),
    ("missing column", _drop_train_row_column, ["folds"], ["'grp'", "competition.group"]),
    ("duplicate ids", _duplicate_id, ["folds"], ["duplicate ids", "r00001"]),
    ("NaN target", _nan_target, ["folds"], ["'target'", "NaN", "line(s) 6"]),
    ("too few groups", None, ["folds", "folds.n_splits=12"], ["only 9 groups", "folds.n_splits=12"]),
    ("rare class", _rare_class, ["folds"], ["fewer members", "7 (1 rows)"]),
    ("missing test image found by folds", _missing_test_image, ["folds"], ["test.csv", "t00003"]),
    ("broken train image found by folds", _broken_train_image, ["folds"], ["train.csv", "r00005", "cannot be read"]),
    ("truncated test image found by a full decode", _broken_test_image,
     ["folds", "competition.check_images=decode"], ["t00002", "cannot be read"]),
    ("unknown backbone", None, ["train", "model.backbone=resnet_999"], ["model.backbone", "resnet_999"]),
    ("unknown augmentation", None, ["train", "train.augment=[HorizontalFlipp]"], ["HorizontalFlipp", "HorizontalFlip"]),
    ("epochs 0", None, ["train", "train.epochs=0"], ["train.epochs = 0"]),
    ("negative lr", None, ["train", "train.lr=-1"], ["train.lr = -1", "greater than 0"]),
    ("batch size 0", None, ["train", "train.batch_size=0"], ["train.batch_size = 0"]),
    ("epochs not a number", None, ["train", "train.epochs=abc"], ["train.epochs = 'abc'", "valid integer"]),
    ("loss for another head", None, ["train", "train.loss=mae"], ["train.loss 'mae'", "multiclass head", "ce, focal"]),
    ("metric for another task", None, ["train", "competition.metric=rmse"], ["competition.metric 'rmse'", "multiclass"]),
    ("unknown key", None, ["train", "train.learning_rate=0.1"], ["train.learning_rate", "train.lr"]),
    ("stack model typo", None, ["stack", "stack.model=lgb"], ["stack.model = 'lgb'", "lgbm"]),
    ("no trained models for features", None, ["features"], ["fold0", "make train"]),
    ("leaderboard: bad pattern", None, ["lb", "--pattern", "("], ["--pattern '('"]),
    ("leaderboard: unknown experiment", None, ["lb", "set", "nope", "--public", "0.5"], ["'nope'"]),
    ("leaderboard: score not a number", None, ["lb", "set", "tiny:folds", "--public", "abc"], ["--public", "'abc'"]),
]


@pytest.mark.parametrize("case,damage,argv,names", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line_naming_the_culprit(tmp_path, capsys, case, damage, argv, names):
    root = _comp(tmp_path)
    if argv[0] in ("features", "lb", "train") and not damage:
        assert main(["folds", *CFG, *BASE]) == 0
    if damage:
        damage(root)
    code = main(argv if argv[0] == "lb" else [argv[0], *CFG, *BASE, *argv[1:]])
    err = capsys.readouterr().err.split("\r")[-1]  # (after any cleared progress bar)
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1
    for n in names:
        assert n in err, (n, err)
    if argv[0] == "folds" and damage:
        assert not (tmp_path / "folds").exists() or not any((tmp_path / "folds").iterdir())  # nothing written


def _fake_feature_set(name, ids, pred):
    """A complete feature set (meta.json + matching parquet key) with the given test predictions."""
    from pipeline.store.io import parquet_to

    d = __import__("pathlib").Path("features") / name
    d.mkdir(parents=True)
    df = pd.DataFrame({"id": ids})
    for j in range(pred.shape[1]):
        df[f"{name}__target__{j}__mean"] = pred[:, j]
    parquet_to(d / "test.parquet", df, {"stage_key": "k"})
    (d / "meta.json").write_text(json.dumps({"stage_key": "k"}))


def test_submit_refuses_nan_predictions_and_sample_test_id_mismatch(tmp_path, capsys):
    root = _comp(tmp_path)
    ids = pd.read_csv(root / "test.csv", dtype={"id": str})["id"]
    pred = np.full((len(ids), 3), 1 / 3)
    pred[2] = np.nan
    _fake_feature_set("nanset", ids, pred)
    assert main(["submit", *CFG, *BASE, "submit.source=nanset"]) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and f"'{ids[2]}'" in err and "Traceback" not in err
    _fake_feature_set("okset", ids, np.full((len(ids), 3), 1 / 3))
    sample = pd.read_csv(root / "sample_submission.csv", dtype={"id": str})
    sample.iloc[:-1].to_csv(root / "sample_submission.csv", index=False)  # one test id missing
    assert main(["submit", *CFG, *BASE, "submit.source=okset"]) == 2
    err = capsys.readouterr().err
    assert "sample_submission.csv" in err and "test.csv" in err and f"'{ids.iloc[-1]}'" in err
    assert not (tmp_path / "submissions" / "okset.csv").exists()


def test_half_written_features_are_refused_by_submit(tmp_path, capsys):
    root = _comp(tmp_path)
    ids = pd.read_csv(root / "test.csv", dtype={"id": str})["id"]
    _fake_feature_set("half", ids, np.full((len(ids), 3), 1 / 3))
    (tmp_path / "features/half/meta.json").unlink()  # as a kill -9 mid-commit leaves it
    assert main(["submit", *CFG, *BASE, "submit.source=half"]) == 2
    assert "incomplete" in capsys.readouterr().err


def test_string_class_labels_are_supported_end_to_end(tmp_path):
    """Kaggle competitions often label classes 'cat', 'dog': the stages train on their index and the
    submission carries the labels again (scored locally against a string solution)."""
    from pipeline.store.io import read_json

    root = _comp(tmp_path)
    names = np.array(["cat", "dog", "eel"])
    for f, col in (("train.csv", "target"), ("solution.csv", "target")):
        df = pd.read_csv(root / f)
        df[col] = names[df[col]]
        df.to_csv(root / f, index=False)
    sample = pd.read_csv(root / "sample_submission.csv")
    sample["target"] = "cat"
    sample.to_csv(root / "sample_submission.csv", index=False)
    for stage in ("folds", "train", "features", "submit"):
        assert main([stage, *CFG, *BASE, "train.epochs=2"]) == 0, stage
    sub = pd.read_csv(tmp_path / "submissions/tiny.csv", dtype={"id": str})
    assert set(sub["target"]) <= set(names) and list(sub["id"]) == list(sample["id"].astype(str))
    # each row's label is the one of its most probable class index (sorted labels: 0 cat, 1 dog, 2 eel)
    feats = pd.read_parquet(tmp_path / "features/tiny/test.parquet").set_index("id").loc[sub["id"]]
    probs = feats[[f"tiny__target__{j}__mean" for j in range(3)]].to_numpy()
    assert list(sub["target"]) == list(names[probs.argmax(1)])
    local = read_json(tmp_path / "submissions/tiny.json")["local"]
    sol = pd.read_csv(root / "solution.csv", dtype={"id": str})
    pub = (sol["Usage"] == "Public").to_numpy()
    assert local["public"] == pytest.approx(float((sub["target"][pub] == sol["target"][pub]).mean()))


def test_no_traceback_from_the_real_command_line(tmp_path):
    _comp(tmp_path)
    run = subprocess.run([sys.executable, "-m", "pipeline", "train", *CFG, *BASE, "train.lr=-1"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "Traceback" not in run.stderr
    debug = subprocess.run([sys.executable, "-m", "pipeline", "--debug", "train", *CFG, *BASE, "train.lr=-1"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug shows where it came from
