"""Kaggle's folder layouts with RGB JPEGs: train_images/ beside test_images/, a path column, class folders;
their chain (`make folds train stack submit` and the offline notebook) is in tests/test_kaggle.py."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.__main__ import main
from pipeline.competition.tables import image_paths, load_test, load_train
from pipeline.config.loading import load_config
from pipeline.errors import ConfigError, InputError


def _jpeg(path, label: int, rng, size: int = 48):
    """An RGB JPEG whose colour says its class (so a tiny net learns it in an epoch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    base = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 230]][label], dtype=np.float32)
    img = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img, "RGB").save(path, quality=90)


def split_competition(root, n_train: int = 90, n_test: int = 30, seed: int = 0):
    """train_images/<id>.jpg and test_images/<id>.jpg, as many Kaggle competitions ship them."""
    rng = np.random.default_rng(seed)
    y, y_test = rng.integers(0, 3, n_train), rng.integers(0, 3, n_test)
    for i, label in enumerate(y):
        _jpeg(root / "train_images" / f"tr{i}.jpg", int(label), rng)
    for i, label in enumerate(y_test):
        _jpeg(root / "test_images" / f"te{i}.jpg", int(label), rng)
    pd.DataFrame({"image_id": [f"tr{i}" for i in range(n_train)], "label": y,
                  "site": [f"s{i % 9}" for i in range(n_train)]}).to_csv(root / "train.csv", index=False)
    test_ids = [f"te{i}" for i in range(n_test)]
    pd.DataFrame({"image_id": test_ids}).to_csv(root / "test.csv", index=False)
    pd.DataFrame({"image_id": test_ids, "label": 0}).to_csv(root / "sample_submission.csv", index=False)
    pd.DataFrame({"image_id": test_ids, "label": y_test, "Usage": ["Public", "Private"] * (n_test // 2)}).to_csv(
        root / "solution.csv", index=False)
    return root


def _cfg(root, tmp_path, *extra):
    return load_config(None, [f"workdir={tmp_path}", f"competition.root={root}", "competition.id=image_id",
                              "competition.target=label", "competition.group=site",
                              "competition.train_image=train_images/{id}.jpg",
                              "competition.test_image=test_images/{id}.jpg", "data.in_chans=3", "data.image_size=32",
                              "folds.n_splits=3", "model.backbone=resnet10t", "train.epochs=2", "train.batch_size=16",
                              "train.lr=0.003", "features.batch_size=32", "stack.model=weighted",
                              "data.normalize=imagenet", "name=rgb", *extra])


def test_each_split_has_its_own_image_pattern_or_a_split_placeholder(tmp_path):
    root = split_competition(tmp_path / "comp", 6, 4)
    cfg = _cfg(root, tmp_path)
    assert image_paths(cfg, ["tr1"], "train") == [root / "train_images/tr1.jpg"]
    assert image_paths(cfg, ["te1"], "test") == [root / "test_images/te1.jpg"]
    placeholder = load_config(None, [f"competition.root={root}", "competition.image='{split}_images/{id}.jpg'"])
    assert image_paths(placeholder, ["te1"], "test") == [root / "test_images/te1.jpg"]
    with pytest.raises(ConfigError, match=r"knows only the placeholders \{id\} and \{split\}"):
        load_config(None, ["competition.test_image=x/{fold}/{id}.jpg"])
    (root / "test_images/te2.jpg").unlink()
    with pytest.raises(InputError, match=r"te2.*check competition.test_image / competition.image "
                                         r"\('test_images/\{id\}.jpg'\)"):
        load_test(cfg, check_images=True)


def test_class_folders_are_indexed_into_a_train_csv_read_through_a_path_column(tmp_path, capsys):
    rng = np.random.default_rng(1)
    root = tmp_path / "flowers"
    for label, name in enumerate(["daisy", "rose"]):
        for i in range(3):
            _jpeg(root / "train" / name / f"{i}.jpg", label, rng, 24)
    assert main(["index", str(root)]) == 0
    assert "competition.path_column=path" in capsys.readouterr().out
    table = pd.read_csv(root / "train.csv")
    assert list(table.columns) == ["id", "label", "path"] and sorted(set(table["label"])) == ["daisy", "rose"]
    assert table["id"].is_unique and table["path"].iloc[0] == "train/daisy/0.jpg"
    cfg = load_config(None, [f"competition.root={root}", "competition.target=label", "competition.path_column=path",
                             "competition.check_images=false"])
    df = load_train(cfg)
    assert sorted(df["label"].unique()) == [0, 1]  # string labels trained as their index
    assert image_paths(cfg, df["id"], "train")[0] == root / "train/daisy/0.jpg"
    # test.csv without the column (the index is of the train folders): the test images follow their pattern
    pd.DataFrame({"id": ["a"]}).to_csv(root / "test.csv", index=False)
    tcfg = load_config(None, [f"competition.root={root}", "competition.target=label", "competition.path_column=path",
                              "competition.test_image=test/{id}.jpg"])
    assert image_paths(tcfg, ["a"], "test") == [root / "test/a.jpg"]
    table.loc[0, "path"] = None
    table.to_csv(root / "train.csv", index=False)
    with pytest.raises(InputError, match="column 'path' \\(competition.path_column\\) is empty at line\\(s\\) 2"):
        image_paths(cfg, df["id"], "train")


# (the RGB competition's chain: `make folds train stack submit` and the offline notebook, tests/test_kaggle.py)


def test_jpegs_are_decoded_at_the_smallest_scale_that_covers_the_image_size(tmp_path):
    from pipeline.competition.images import ImageDataset, build_transform, decode_size, read_image

    rng = np.random.default_rng(2)
    _jpeg(tmp_path / "a.jpg", 0, rng, size=256)
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.jpg", 3).shape == (256, 256, 3)
    assert read_image(tmp_path / "a.jpg", 3, 64).shape == (64, 64, 3)  # 1/4 scale covers 64
    assert read_image(tmp_path / "a.jpg", 1, 100).shape == (128, 128, 1)  # 1/2 scale: 1/4 would be too small
    assert read_image(tmp_path / "a.png", 3, 64).shape == (256, 256, 3)  # only JPEG has a draft mode
    cfg = load_config(None, ["data.image_size=64", "data.in_chans=3"])
    assert decode_size(cfg["data"]) == 64
    assert decode_size(load_config(None, ["data.image_size=64", "data.jpeg_draft=false"])["data"]) is None
    ds = ImageDataset([tmp_path / "a.jpg"], 3, build_transform(cfg["data"]), size=decode_size(cfg["data"]))
    assert ds.image(0).shape == (64, 64, 3) and tuple(ds[0][0].shape) == (3, 64, 64)
