from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.errors import InputError
from pipeline.predict import tta as TTA
from pipeline.stages import features as FE
from pipeline.stages import folds as FO
from pipeline.stages import train as T
from pipeline.store.io import read_parquet_meta
from pipeline.training.models import Head, Net
from tests.conftest import tiny_cfg


@pytest.fixture
def trained(workdir):
    cfg = tiny_cfg(workdir / "comp", "train.epochs=1")
    T.run(cfg)
    return cfg


class PointwiseBackbone(nn.Module):
    """1x1 convolutions only: the feature map is flip/rotation-equivariant, so avg-pooled outputs are invariant."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 1)

    def forward_features(self, x):
        return torch.relu(self.conv(x))


def loader(n=10, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    return DataLoader(TensorDataset(x, torch.zeros(n), torch.arange(n)), batch_size=4,
                      collate_fn=lambda b: (torch.stack([t[0] for t in b]), {}, None))


def test_d4_of_an_invariant_model_has_zero_variance():
    torch.manual_seed(0)
    net = Net(PointwiseBackbone(), [Head("t", ["t"], "multiclass", 3)])
    out = TTA.predict_views(net, net.head_specs, loader(), TTA.tta_views("d4"), "cpu")
    df = TTA.aggregate("e", out, ["mean", "var", "max", "min"], keep_views=False)
    assert out["t"].shape == (8, 10, 3)
    assert np.allclose(df.filter(like="__var").to_numpy(), 0, atol=1e-12)
    # ... and the 8 views are the 8 distinct symmetries of the square (8 copies of one view would pass above)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    seen = {tuple(v(x).flatten().tolist()) for v in TTA.tta_views("d4")}
    square = {tuple(torch.rot90(t, k, (2, 3)).flatten().tolist()) for t in (x, x.flip(3)) for k in range(4)}
    assert seen == square and len(seen) == 8


def test_mean_over_views_equals_ttach_merged_mean_and_batched_equals_loop():
    import ttach as tta

    torch.manual_seed(0)
    from pipeline.training.models import create_backbone

    net = Net(create_backbone("test_resnet", 1), [Head("t", ["t"], "multiclass", 3)]).eval()
    out = TTA.predict_views(net, net.head_specs, loader(size=16), TTA.tta_views("d4"), "cpu")
    ours = TTA.aggregate("e", out, ["mean"], False).to_numpy()
    wrapped = tta.ClassificationTTAWrapper(lambda x: net(x)["t"].softmax(-1), tta.aliases.d4_transform(), merge_mode="mean")
    with torch.no_grad():
        theirs = torch.cat([wrapped(x) for x, _, _ in loader(size=16)]).numpy()
    assert np.allclose(ours, theirs, atol=1e-6)
    # one forward pass per view gives the same numbers as the stacked batch
    with torch.no_grad():
        loop = np.stack([torch.cat([net(v(x))["t"].softmax(-1) for x, _, _ in loader(size=16)]).numpy()
                         for v in TTA.tta_views("d4")])
    assert np.allclose(out["t"], loop, atol=1e-5)


def test_identity_tta_equals_plain_inference_and_oof_is_out_of_fold(trained):
    out = FE.run(trained)
    oof = pd.read_parquet(out / "oof.parquet")
    folds = pd.read_csv("folds/demo.csv", dtype={"id": str})
    assert oof["id"].is_unique and set(oof["id"]) == set(folds["id"])
    assert (oof.set_index("id")["fold"] == folds.set_index("id")["fold"].loc[oof["id"]]).all()
    for k in range(3):
        valid = pd.read_parquet(f"models/tiny/fold{k}/best_valid.parquet").set_index("id")
        mine = oof.set_index("id").loc[valid.index]
        plain = valid[[f"target__{j}" for j in range(3)]].to_numpy()
        assert np.allclose(mine[[f"tiny__target__{j}__mean" for j in range(3)]].to_numpy(), plain, atol=1e-5)
    test = pd.read_parquet(out / "test.parquet")
    assert list(test["id"]) == list(pd.read_csv("comp/test.csv", dtype={"id": str})["id"])
    meta = read_parquet_meta(out / "oof.parquet")
    assert meta["folds_hash"] and meta["config_hash"] and "commit" in meta["git"]


@pytest.mark.parametrize("cache", ["auto", "false"])
def test_test_images_are_decoded_once_for_all_fold_models_when_cached(trained, monkeypatch, cache):
    from pipeline.competition import images
    from pipeline.competition.tables import image_paths, load_test

    reads = []
    real = images.read_image
    monkeypatch.setattr(images, "read_image", lambda path, c, size=None: reads.append(str(path)) or real(path, c, size))
    cfg = tiny_cfg(trained["competition"]["root"], "train.epochs=1", f"data.cache={cache}")
    got = pd.read_parquet(FE.run(cfg, force=True) / "test.parquet")
    test_paths = [str(p) for p in image_paths(cfg, load_test(cfg)["id"], "test")]
    per_image = pd.Series(reads)[pd.Series(reads).isin(test_paths)].value_counts().reindex(test_paths, fill_value=0)
    if cache == "auto":  # once for all 3 fold models
        assert (per_image == 1).all()
    else:
        assert (per_image == 3).all()
    ref = FE.run(tiny_cfg(trained["competition"]["root"], "train.epochs=1", "data.cache=false"), force=True)
    assert np.allclose(got.drop(columns="id").to_numpy(), pd.read_parquet(ref / "test.parquet").drop(columns="id").to_numpy())


def test_tta_stats_columns_and_resume(trained, capsys):
    cfg = tiny_cfg(trained["competition"]["root"], "train.epochs=1", "features.tta=hflip", "features.keep_views=true")
    out = FE.run(cfg)
    oof = pd.read_parquet(out / "oof.parquet")
    for stat in ("mean", "var", "max", "min", "v0", "v1"):
        assert f"tiny__target__2__{stat}" in oof.columns
    assert (oof["tiny__target__0__max"] >= oof["tiny__target__0__min"]).all()
    (out / "oof.parquet").unlink()
    FE.run(cfg)
    assert capsys.readouterr().out.count("already dumped") == 3  # every fold reused, nothing recomputed


def test_a_folds_file_mismatch_is_refused(trained):
    FO.run(tiny_cfg(trained["competition"]["root"], "folds.seed=5"))  # a different split
    with pytest.raises(InputError, match="trained with folds file hash"):
        FE.run(trained)


def test_images_are_prepared_as_the_model_was_trained(trained):
    # a later change of data.image_size is another config: its features are refused (train --check would
    # retrain), never made by feeding the fold models another input size; a features-only change is fine
    with pytest.raises(InputError, match="fold0: the fold model is out of date"):
        FE.run(tiny_cfg(trained["competition"]["root"], "train.epochs=1", "data.image_size=24"), force=True)
    base = pd.read_parquet(FE.run(trained) / "oof.parquet")
    again = FE.run(tiny_cfg(trained["competition"]["root"], "train.epochs=1", "features.batch_size=32"), force=True)
    pd.testing.assert_frame_equal(base, pd.read_parquet(again / "oof.parquet"), atol=1e-6)


def test_missing_fold_model_is_refused(trained):
    import shutil

    shutil.rmtree("models/tiny/fold1")
    with pytest.raises(InputError, match="no trained model for fold 1"):
        FE.run(trained)


def test_embedding_with_pca_fitted_on_fold_train_rows(trained):
    cfg = tiny_cfg(trained["competition"]["root"], "train.epochs=1", "features.embedding=true", "features.pca=3")
    out = FE.run(cfg)
    oof, test = pd.read_parquet(out / "oof.parquet"), pd.read_parquet(out / "test.parquet")
    emb = [c for c in oof.columns if "__embedding__" in c]
    assert emb == [f"tiny__embedding__{j}__value" for j in range(3)]
    assert set(emb) <= set(test.columns) and oof[emb].notna().all().all()
    # fitted on the fold's training rows: refitting on them reproduces fold 0's OOF coordinates

    from pipeline.competition.tables import image_paths
    from pipeline.predict.model_run import ModelRun

    folds = pd.read_csv("folds/demo.csv", dtype={"id": str})
    run = ModelRun("models/tiny/fold0/best.pt", "cpu", fold=0)
    ids_train = folds["id"][folds["fold"] != 0]
    pca = FE.fit_fold_pca(run, image_paths(cfg, ids_train, "train"), 64, 0, 3, cfg["seed"])
    ids_valid = folds["id"][folds["fold"] == 0]
    e = run.predict(image_paths(cfg, ids_valid, "train"), embed=True)["embedding"]
    mine = oof.set_index("id").loc[list(ids_valid), emb].to_numpy()
    assert np.allclose(pca.transform(e), mine, atol=1e-4)


def test_predictor_matches_the_features_stage_on_test(trained):
    from pipeline.predict.predictor import Predictor

    out = FE.run(trained)
    test = pd.read_parquet(out / "test.parquet")
    pred = Predictor.from_experiment("models/tiny").predict([f"comp/images/{i}.png" for i in test["id"]])
    assert np.allclose(pred["target"], test[[f"tiny__target__{j}__mean" for j in range(3)]].to_numpy(), atol=1e-5)
    one = Predictor.from_experiment("models/tiny", folds=[0]).predict([np.zeros((16, 16), np.uint8)], tta="d4")
    assert one["target"].shape == (1, 3)


def test_notebook_inference_and_predictor_decode_each_test_image_once_and_match_features(trained, monkeypatch):
    """The Kaggle notebook's level-1 frame and the Predictor run 3 fold models over one decoding of the images."""
    import pipeline.predict.predictor as PR
    from pipeline.competition import images
    from pipeline.competition.tables import load_test
    from pipeline.kaggle.inference import level1_frame

    ref = pd.read_parquet(FE.run(trained) / "test.parquet")
    reads = []
    real = images.read_image
    counting = lambda path, c, size=None: reads.append(str(path)) or real(path, c, size)
    monkeypatch.setattr(images, "read_image", counting)
    monkeypatch.setattr(PR, "read_image", counting)
    spec = {"features": trained["features"], "models": [f"models/tiny/fold{k}/best.pt" for k in range(3)]}
    frame = level1_frame(Path("."), "tiny", spec, trained, load_test(trained), torch.device("cpu"))
    assert len(reads) == len(ref) and len(set(reads)) == len(ref)  # once each, not once per fold model
    cols = [c for c in ref.columns if c != "id"]
    assert list(frame["id"]) == list(ref["id"]) and np.allclose(frame[cols].to_numpy(), ref[cols].to_numpy(), atol=1e-5)
    reads.clear()
    pred = PR.Predictor.from_experiment("models/tiny").predict([f"comp/images/{i}.png" for i in ref["id"]])
    assert len(reads) == len(ref) and len(set(reads)) == len(ref)
    assert np.allclose(pred["target"], ref[[f"tiny__target__{j}__mean" for j in range(3)]].to_numpy(), atol=1e-5)


def test_all_data_model_joins_the_test_mean_when_asked(workdir):
    cfg = tiny_cfg(workdir / "comp", "train.epochs=1", "train.full=true", "features.use_full=true")
    T.run(cfg)
    assert (workdir / "models/tiny/foldfull/best.pt").exists()
    out = FE.run(cfg)
    parts = [pd.read_parquet(out / "parts" / f"fold{k}_test.parquet") for k in (0, 1, 2, "full")]
    cols = [f"tiny__target__{j}__mean" for j in range(3)]
    test = pd.read_parquet(out / "test.parquet")
    assert np.allclose(test[cols].to_numpy(), np.mean([p[cols].to_numpy() for p in parts], axis=0), atol=1e-6)
    assert not (out / "parts" / "foldfull_oof.parquet").exists()  # the all-data model never makes OOF rows
    # with PCA the all-data model's embedding is reduced too (fitted on its own training rows: all of them),
    # so the test mean adds PCA coordinates to PCA coordinates, never to raw embedding dimensions
    pca = tiny_cfg(workdir / "comp", "train.epochs=1", "train.full=true", "features.use_full=true",
                   "features.embedding=true", "features.pca=2")
    out = FE.run(pca)
    full = pd.read_parquet(out / "parts" / "foldfull_test.parquet")
    assert [c for c in full.columns if "__embedding__" in c] == [f"tiny__embedding__{j}__value" for j in range(2)]
    # a full model left over from another config is refused, not averaged in
    T.run(tiny_cfg(workdir / "comp", "train.epochs=2"))  # the folds retrained with another config; full stays
    with pytest.raises(InputError, match="foldfull was trained with another config"):
        FE.run(tiny_cfg(workdir / "comp", "train.epochs=2", "features.use_full=true"))
    from pipeline.predict.predictor import Predictor

    with pytest.raises(InputError, match="foldfull was trained with another config"):
        Predictor.from_experiment(workdir / "models/tiny", use_full=True)
    assert len(Predictor.from_experiment(workdir / "models/tiny").models) == 3
    assert FE.run(tiny_cfg(workdir / "comp", "train.epochs=2")).name == "tiny"  # without it, features go on
    # an all-data model whose training did not finish (train removes its meta.json first) is named, not a KeyError
    (workdir / "models/tiny/foldfull/meta.json").unlink()
    with pytest.raises(InputError, match="or did not finish"):
        FE.run(tiny_cfg(workdir / "comp", "train.epochs=2", "features.use_full=true"))


def test_all_data_model_alone_predicts_test_while_fold_models_make_the_oof(workdir):
    """features.use_full=only: test.parquet is the all-data model's output alone (one model to ship), the
    OOF rows and the CV are the fold models' as without it, and the bundle and the Predictor carry that model only."""
    from pipeline.competition.tables import load_test
    from pipeline.kaggle.inference import level1_frame
    from pipeline.predict.predictor import Predictor
    from pipeline.stages.kaggle import collect

    T.run(tiny_cfg(workdir / "comp", "train.epochs=1"))
    with pytest.raises(InputError, match="no all-data model"):  # asked for, not trained: refused, not ignored
        FE.run(tiny_cfg(workdir / "comp", "train.epochs=1", "features.use_full=only"))
    cfg = tiny_cfg(workdir / "comp", "train.epochs=1", "train.full=true", "features.use_full=only")
    T.run(cfg)
    folds_only = pd.read_parquet(FE.run(tiny_cfg(workdir / "comp", "train.epochs=1", "train.full=true")) / "oof.parquet")
    out = FE.run(cfg)
    cols = [f"tiny__target__{j}__mean" for j in range(3)]
    test, full = pd.read_parquet(out / "test.parquet"), pd.read_parquet(out / "parts" / "foldfull_test.parquet")
    assert np.allclose(test[cols].to_numpy(), full[cols].to_numpy(), atol=1e-7)
    folds_mean = np.mean([pd.read_parquet(out / "parts" / f"fold{k}_test.parquet")[cols].to_numpy() for k in range(3)], 0)
    assert not np.allclose(test[cols].to_numpy(), folds_mean, atol=1e-4)  # the fold models are left out
    pd.testing.assert_frame_equal(pd.read_parquet(out / "oof.parquet"), folds_only)  # the CV is the fold models'
    assert read_parquet_meta(out / "test.parquet")["test_models"] == ["full"]
    sets, files = {}, {}
    collect(cfg, "tiny", sets, files)
    assert sets["tiny"]["models"] == ["models/tiny/foldfull.pt"] and [f for f in files if f.startswith("models/")] == [
        "models/tiny/foldfull.pt"]
    frame = level1_frame(Path("."), "tiny", {**sets["tiny"], "models": ["models/tiny/foldfull/best.pt"]}, cfg,
                         load_test(cfg), torch.device("cpu"))
    assert np.allclose(frame[cols].to_numpy(), test[cols].to_numpy(), atol=1e-5)  # the notebook predicts the same
    alone = Predictor.from_experiment(workdir / "models/tiny", use_full="only")
    assert len(alone.models) == 1
    pred = alone.predict([f"comp/images/{i}.png" for i in test["id"]], tta=cfg["features"]["tta"])
    assert np.allclose(pred["target"], test[cols].to_numpy(), atol=1e-5)


@pytest.mark.parametrize("tta,scales", [("hflip", [1.0]), ("d4", [1.0]), ("none", [0.875, 1.0, 1.125]),
                                        ("flip", [1.0, 1.25])])
def test_each_tta_view_row_by_row_equals_the_model_on_that_transformed_image_alone(tta, scales):
    """Batched, stacked-by-size view prediction must give, for every view and every row, exactly what the
    fold model gives for that one transformed image (no view-order, resize or batching mix-up)."""
    import timm

    torch.manual_seed(0)
    net = Net(timm.create_model("test_resnet", pretrained=False, num_classes=0, global_pool="", in_chans=1),
              [Head("t", ["t"], "multiclass", 3)], "avg", False, 0.0).eval()
    views = TTA.tta_views(tta, scales)
    x = torch.rand(10, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    data = DataLoader(TensorDataset(x, torch.zeros(10), torch.arange(10)), batch_size=4,
                      collate_fn=lambda b: (torch.stack([t[0] for t in b]), {}, None))
    out = TTA.predict_views(net, net.head_specs, data, views, "cpu")["t"]  # (V, N, C)
    assert out.shape == (len(views), 10, 3)
    with torch.no_grad():
        for v, view in enumerate(views):
            for i in range(10):
                alone = net(view(x[i:i + 1]))["t"].softmax(-1)[0].numpy()
                np.testing.assert_allclose(out[v, i], alone, atol=1e-5, err_msg=f"view {v}, row {i}")
    assert np.allclose(out[0], net(x)["t"].softmax(-1).detach().numpy(), atol=1e-5)  # view 0 is the identity
