"""model.pretrained: timm weights from a local file or folder (never a download), through timm's own loader,
into 1- and 3-channel models; data.normalize follows the weights and travels in every checkpoint."""
import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf

from pipeline.config.loading import load_config
from pipeline.errors import ConfigError, InputError
from pipeline.training.models import create_backbone
from pipeline.training.pretrained import IMAGENET, with_normalization

NAME = "resnet10t"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One timm model's weights in each layout a competitor attaches: timm's Hub folder, a bare safetensors
    file, a Hugging Face cache folder and a Kaggle Models mount (the Hub folder a few levels down)."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False)
    save_for_hf(model, str(root / "hub"), safe_serialization=True)
    save_file(model.state_dict(), str(root / "bare.safetensors"))
    snap = root / "hf" / f"models--timm--{NAME}.local" / "snapshots" / "abc123"
    save_for_hf(model, str(snap), safe_serialization=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    save_for_hf(model, str(root / "kaggle" / "pytorch" / "default" / "1"), safe_serialization=True)
    return root, model.state_dict()


def _timms_own(file, in_chans):
    return timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), in_chans=in_chans,
                             num_classes=0, global_pool="")


@pytest.mark.parametrize("layout", ["hub", "bare.safetensors", f"hf/models--timm--{NAME}.local", "kaggle"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_every_tensor_equals_what_timms_own_loader_gives(weights, layout, in_chans, monkeypatch):
    root, saved = weights
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    net = create_backbone(NAME, in_chans, None, str(root / layout))
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # asked before timm could reach the Hub
    reference = _timms_own(root / "bare.safetensors", in_chans).state_dict()
    ours = net.state_dict()
    assert set(ours) == set(reference)
    for k in ours:
        assert torch.equal(ours[k], reference[k]), k
    stem = "conv1.0.weight"
    if in_chans == 3:
        assert all(torch.equal(ours[k], saved[k]) for k in ours)  # the saved weights, untouched
    else:  # timm's 1-channel stem: the RGB filters summed
        assert torch.allclose(ours[stem], saved[stem].sum(1, keepdim=True))
    assert "fc.weight" not in ours  # the classifier is dropped: the heads are ours


@pytest.mark.parametrize("layout", ["hub", "bare.safetensors"])
def test_loading_opens_no_network_connection(weights, layout, monkeypatch):
    """timm.create_model(pretrained=True) is only ever asked for the local file: a socket that refuses every
    connection (an offline Kaggle notebook) changes nothing."""
    import socket

    def offline(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    root, saved = weights
    net = create_backbone(NAME, 3, None, str(root / layout))
    assert torch.equal(net.state_dict()["conv1.0.weight"], saved["conv1.0.weight"])


def test_a_missing_or_wrong_file_is_named(weights, tmp_path):
    root, _ = weights
    with pytest.raises(InputError, match=r"model.pretrained: .*nope.safetensors does not exist \(no download"):
        create_backbone(NAME, 3, None, str(tmp_path / "nope.safetensors"))
    with pytest.raises(InputError, match=r"holds a 'resnet10t' \(its config.json\), but model.backbone is 'resnet18'"):
        create_backbone("resnet18", 3, None, str(root / "hub"))
    with pytest.raises(InputError, match=r"bare.safetensors does not fit model.backbone 'resnet18'"):
        create_backbone("resnet18", 3, None, str(root / "bare.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty holds no weights file"):
        create_backbone(NAME, 3, None, str(tmp_path / "empty"))


def test_a_pickled_weights_file_that_would_run_code_is_refused(tmp_path):
    import pathlib

    class Evil:
        def __reduce__(self):
            return (pathlib.Path.write_text, (pathlib.Path(tmp_path / "ran"), "x"))

    torch.save({"conv1.0.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(InputError, match="refused to load"):
        create_backbone(NAME, 3, None, str(tmp_path / "evil.pth"))
    assert not (tmp_path / "ran").exists()


def test_normalisation_follows_the_weights_and_is_refused_twice(weights):
    root, _ = weights
    hub_cfg = json.loads((root / "hub" / "config.json").read_text())["pretrained_cfg"]
    cfg = load_config(None, [f"model.pretrained={root / 'hub'}", f"model.backbone={NAME}", "data.in_chans=3"])
    d = with_normalization(cfg)["data"]
    assert (d["mean"], d["std"]) == (list(hub_cfg["mean"]), list(hub_cfg["std"]))
    grey = with_normalization(load_config(None, [f"model.pretrained={root / 'hub'}", f"model.backbone={NAME}",
                                                 "data.in_chans=1"]))["data"]
    assert grey["mean"] == pytest.approx([float(np.mean(hub_cfg["mean"]))])
    plain = load_config(None, ["data.in_chans=3"])
    assert with_normalization(plain) is plain  # no weights: data.mean/std as before (0.5 when unset)
    assert with_normalization(load_config(None, ["data.normalize=imagenet"]))["data"]["std"] == list(IMAGENET[1])
    with pytest.raises(ConfigError, match="data.mean/data.std are used only with data.normalize=dataset"):
        load_config(None, [f"model.pretrained={root / 'hub'}", "data.mean=[0.1,0.1,0.1]"])


def test_a_pretrained_fold_model_records_its_normalisation_for_every_reader(weights, workdir):
    """Training from model.pretrained starts from those weights, and the checkpoint (and a bundle's slim copy
    of it, what the notebook predicts with) carries the weights' mean/std."""
    from pipeline.stages import train as T
    from pipeline.stages.kaggle import copy_checkpoint
    from pipeline.training.checkpoint import Checkpoint
    from tests.conftest import make_competition, tiny_cfg

    root, saved = weights
    make_competition(workdir / "comp", n=60, n_groups=6)
    cfg = tiny_cfg(workdir / "comp", f"model.pretrained={root / 'hub'}", f"model.backbone={NAME}",
                   "train.folds=[0]", "train.epochs=1", "train.lr=1e-12", name="pre")
    T.run(cfg)
    ck = Checkpoint.read("models/pre/fold0/best.pt")
    mean = float(np.mean(json.loads((root / "hub" / "config.json").read_text())["pretrained_cfg"]["mean"]))
    assert ck.data_cfg["mean"] == pytest.approx([mean]) and ck.data_cfg["normalize"] == "auto"
    layer = "backbone.layer4.0.conv1.weight"
    assert torch.allclose(ck.weights[layer], saved[layer.removeprefix("backbone.")], atol=1e-6)  # started there
    copy_checkpoint(workdir / "models/pre/fold0/best.pt", workdir / "slim.pt", fp16=True)
    assert Checkpoint.read(workdir / "slim.pt").data_cfg["mean"] == pytest.approx([mean])
