import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.errors import InputError
from pipeline.stages import lr_find as LF
from pipeline.stages import train as T
from pipeline.training import losses as L
from pipeline.training import optim as O
from pipeline.training import train_key as FM
from pipeline.training import trainer as TR
from pipeline.training.build import build_model, load_backbone_weights
from pipeline.training.checkpoint import load_model
from pipeline.training.models import Head
from tests.conftest import CFG, TINY, tiny_cfg


def weights(path, key="model"):
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def same_state(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_same_seed_gives_identical_validation_predictions(workdir):
    T.run(tiny_cfg(workdir / "comp", "train.folds=[0]", name="a"))
    T.run(tiny_cfg(workdir / "comp", "train.folds=[0]", name="b"))
    a = pd.read_parquet("models/a/fold0/best_valid.parquet")
    b = pd.read_parquet("models/b/fold0/best_valid.parquet")
    pd.testing.assert_frame_equal(a, b)
    T.run(tiny_cfg(workdir / "comp", "train.folds=[0]", "seed=7", name="c"))
    assert not pd.read_parquet("models/c/fold0/best_valid.parquet").equals(a)


def test_training_learns_and_writes_fold_artifacts(workdir):
    summary = T.run(tiny_cfg(workdir / "comp", "train.epochs=4"))
    assert summary["cv_mean"] > 0.6  # 3 classes with a bright bar per class: learnable
    for k in range(3):
        log = pd.read_csv(f"models/tiny/fold{k}/log.csv")
        assert list(log["epoch"]) == [1, 2, 3, 4] and {"train_loss", "valid_loss", "score", "lr"} <= set(log.columns)
    assert open("models/tiny/curves.png", "rb").read(4) == b"\x89PNG"
    assert summary["oof_rows"] == 90


def _run_cli(workdir, name, *extra, env=None):
    args = [sys.executable, "-m", "pipeline", "train", "--defaults", f"competition.root={workdir / 'comp'}",
            "competition.group=grp",
            "folds.file=folds/{competition}.csv", "data.in_chans=1", "data.image_size=16", f"name={name}",
            "model.backbone=test_resnet", "train.epochs=3", "train.batch_size=16", "folds.n_splits=3",
            "train.folds=[0]", "train.ema=true", "train.mixup=0.4", *extra]
    return subprocess.run(args, cwd=workdir, env={**os.environ, **(env or {})}, capture_output=True, text=True)


@pytest.mark.parametrize("kill_at", ["epoch:1", "step:7"])
def test_resume_after_kill_9_ends_with_same_weights(workdir, kill_at):
    tiny_cfg(workdir / "comp")  # folds
    assert _run_cli(workdir, "whole").returncode == 0
    killed = _run_cli(workdir, "resumed", env={"PIPELINE_KILL_AT": kill_at})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _run_cli(workdir, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if kill_at == "epoch:1":
        assert "resuming from" in resumed.stdout
    whole, again = weights(workdir / "models/whole/fold0/last.pt"), weights(workdir / "models/resumed/fold0/last.pt")
    assert same_state(whole, again)
    assert same_state(weights(workdir / "models/whole/fold0/last.pt", "ema"),
                      weights(workdir / "models/resumed/fold0/last.pt", "ema"))


def test_ema_weights_differ_from_raw_and_are_the_ones_evaluated_and_saved(workdir):
    T.run(tiny_cfg(workdir / "comp", "train.folds=[0]", "train.epochs=1", "train.ema=true", "train.ema_decay=0.9"))
    last = torch.load("models/tiny/fold0/last.pt", map_location="cpu", weights_only=True)
    raw, ema = last["model"], {k.removeprefix("module."): v for k, v in last["ema"].items()}
    best = weights("models/tiny/fold0/best.pt")
    assert not same_state(raw, ema)
    assert same_state(best, ema)  # the single epoch is the best one: its saved weights are the EMA weights
    # the logged validation predictions are those of the EMA weights, not the raw ones
    from pipeline.competition.images import ImageDataset, build_transform
    from pipeline.competition.tables import image_paths

    valid = pd.read_parquet("models/tiny/fold0/best_valid.parquet")
    cfg = tiny_cfg(workdir / "comp")
    ds = ImageDataset(image_paths(cfg, valid["id"], "train"), 1, build_transform(cfg["data"]))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    net, _ = load_model("models/tiny/fold0/best.pt")
    with torch.no_grad():
        p_ema = net(x)["target"].softmax(-1).numpy()
        net.load_state_dict(raw)
        p_raw = net(x)["target"].softmax(-1).numpy()
    logged = valid[[f"target__{j}" for j in range(3)]].to_numpy()
    assert np.allclose(logged, p_ema, atol=1e-5) and not np.allclose(logged, p_raw, atol=1e-5)


def test_early_stopping_stops(workdir):
    T.run(tiny_cfg(workdir / "comp", "train.folds=[0]", "train.epochs=8", "train.early_stopping=1", "train.lr=1e-12"))
    log = pd.read_csv("models/tiny/fold0/log.csv")
    assert len(log) == 2  # lr=0: no improvement after epoch 1, patience 1


def test_swa_weights_are_saved_as_the_model(workdir):
    T.run(tiny_cfg(workdir / "comp", "train.folds=[0]", "train.epochs=3", "train.swa=true", "train.swa_start=0.3"))
    ck = torch.load("models/tiny/fold0/best.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == "swa"
    assert not same_state(ck["model"], weights("models/tiny/fold0/last.pt"))
    # every epoch from swa_start on is in the average (int(0.3 * 3) = 0: all three), not only the first
    swa = torch.load("models/tiny/fold0/last.pt", map_location="cpu", weights_only=True)["swa"]
    assert int(swa["n_averaged"]) == 3


def test_head_only_warmup_then_unfreeze_and_frozen_stages(workdir):
    cfg = tiny_cfg(workdir / "comp", "train.folds=[0]", "train.epochs=1", "train.freeze_backbone_epochs=1")
    init = {k: v.clone() for k, v in build_model_for(cfg).state_dict().items()}
    T.run(cfg)
    after = weights("models/tiny/fold0/last.pt")
    conv = "backbone.conv1.0.weight"
    assert torch.equal(init[conv], after[conv])  # backbone frozen during the head-only epoch
    head = [k for k in after if k.startswith("heads.")][0]
    assert not torch.equal(init[head], after[head])
    cfg2 = tiny_cfg(workdir / "comp", "train.folds=[0]", "train.epochs=1", "model.freeze_stages=1", name="fs")
    T.run(cfg2)
    after2 = weights("models/fs/fold0/last.pt")
    assert torch.equal(init["backbone.layer1.0.conv1.weight"], after2["backbone.layer1.0.conv1.weight"])
    assert not torch.equal(init["backbone.layer3.0.conv1.weight"], after2["backbone.layer3.0.conv1.weight"])
    # after the head-only epoch the backbone trains again
    T.run(tiny_cfg(workdir / "comp", "train.folds=[0]", "train.epochs=2", "train.freeze_backbone_epochs=1", name="thaw"))
    assert not torch.equal(init[conv], weights("models/thaw/fold0/last.pt")[conv])


def build_model_for(cfg):
    TR.seed_everything(TR.epoch_seed(cfg["seed"], 0, -1))
    return build_model(cfg, [Head("target", ["target"], "multiclass", 3)])


def test_losses():
    h = Head("t", ["t"], "multiclass", 3)
    tc = {"label_smoothing": 0.0, "focal_gamma": 2.0, "ohem": 1.0, "loss": "ce"}
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    y = torch.tensor([0, 2])
    ce = L.HeadLoss(h, "ce", tc)(logits, y)
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(logits, y, reduction="none"))
    smooth = L.HeadLoss(h, "ce", {**tc, "label_smoothing": 0.1})(logits, y)
    assert torch.allclose(smooth, torch.nn.functional.cross_entropy(logits, y, reduction="none", label_smoothing=0.1))
    focal = L.HeadLoss(h, "focal", tc)(logits, y)
    assert (focal < ce).all() and focal[0] / ce[0] < focal[1] / ce[1]  # easy example down-weighted more
    crit = L.Criterion([h], {**tc, "ohem": 0.5}, {"t"})
    assert torch.isclose(crit({"t": logits}, {"t": y}), ce.max())  # top-k keeps the hardest half
    w = L.class_weight_tensor({"class_weights": "balanced"}, np.array([0, 0, 0, 1]), 2)
    assert w[1] > w[0]
    r = Head("r", ["r"], "regression", 1)
    rm = L.Criterion([r], {**tc, "loss": "rmse"}, {"r"})({"r": torch.tensor([[1.0], [3.0]])}, {"r": torch.tensor([0.0, 0.0])})
    assert torch.isclose(rm, torch.tensor(np.sqrt(5.0), dtype=torch.float32))


def test_mixup_cutmix_and_switch_off():
    torch.manual_seed(0)
    n, h = 8, 16
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, h, h).clone()  # image i is all i
    y = {"t": torch.arange(n) * 10}
    from pipeline.config.train import Train

    tc = Train(mixup=1.0, cutmix=0.0, mix_prob=1.0, mix_off_epoch=3)
    xm, y2, lam = TR.mix_batch(x, y, tc, epoch=0)
    assert y2 is not None and 0 < lam < 1
    partner = y2["t"] // 10  # mixup: every pixel of image i is lam * i + (1 - lam) * partner
    assert torch.allclose(xm[:, 0, 0, 0], lam * torch.arange(n) + (1 - lam) * partner.float())
    assert TR.mix_batch(x, y, tc, epoch=3)[1] is None  # switched off from mix_off_epoch
    assert TR.mix_batch(x, y, tc.model_copy(update={"mix_prob": 0.0}), epoch=0)[1] is None  # never applied at probability 0
    pasted = 0
    for seed in range(20):
        torch.manual_seed(seed)
        xc, y2, lam = TR.mix_batch(x, y, tc.model_copy(update={"mixup": 0.0, "cutmix": 1.0}), epoch=0)
        src = y2["t"] // 10
        for i in range(n):
            changed = xc[i, 0] != x[i, 0]
            if src[i] == i:
                assert not changed.any()
                continue
            # the pasted box holds the partner's pixels, and its area is what lam says is not image i
            assert (xc[i, 0][changed] == float(src[i])).all()
            assert changed.float().mean().item() == pytest.approx(1 - lam, abs=1e-6)
            pasted += int(changed.any())
    assert pasted > 20  # boxes were really pasted (not an empty-box pass)


def test_schedules():
    from pipeline.config.train import Train

    base = {"epochs": 10, "warmup_epochs": 1, "min_lr_ratio": 0.0, "scheduler": "cosine", "cycle_epochs": 0,
            "gamma": 0.1, "milestones": [5, 8]}
    f = O.lr_lambda(Train(**base), 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(99) < 1e-3
    assert f(10) > f(50) > f(90)
    step = O.lr_lambda(Train(**{**base, "scheduler": "step", "warmup_epochs": 0}), 10)
    assert (step(0), step(50), step(85)) == (1.0, pytest.approx(0.1), pytest.approx(0.01))
    rs = O.lr_lambda(Train(**{**base, "scheduler": "restarts", "warmup_epochs": 0, "cycle_epochs": 5}), 10)
    assert rs(0) == 1.0 and rs(49) < 0.01 and rs(50) == 1.0


def test_timm_schedulers_step_per_update_follow_the_train_keys_and_resume():
    from timm.scheduler import CosineLRScheduler

    from pipeline.config.loading import load_config

    def opt():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    tc = load_config(None, ["train.lr=0.1", "train.epochs=5", "train.warmup_epochs=1", "train.min_lr_ratio=0.1",
                            "train.scheduler=timm.cosine"]).train
    o = opt()
    sched = O.SCHEDULERS[tc.scheduler](o, tc, 10, True)
    assert O.steps_each_batch(sched)
    lrs = [o.param_groups[0]["lr"]]
    for _ in range(50):
        sched.step()
        lrs.append(o.param_groups[0]["lr"])
    assert lrs[0] < lrs[5] < lrs[10] == pytest.approx(0.1)  # a warm-up of one epoch (10 updates), per update
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[50] == pytest.approx(0.01)  # cosine to the floor
    # it is timm's own cosine (warm-up as a prefix, counted in updates), not ours under another name
    o2 = opt()
    ref = CosineLRScheduler(o2, t_initial=40, lr_min=0.01, warmup_t=10, warmup_lr_init=0.001, warmup_prefix=True,
                            t_in_epochs=False)
    want = [o2.param_groups[0]["lr"]] + [(ref.step_update(u), o2.param_groups[0]["lr"])[1] for u in range(1, 51)]
    assert lrs == pytest.approx(want)
    # resume: a fresh scheduler loaded from the state continues where the first stopped
    o3 = opt()
    again = O.SCHEDULERS[tc.scheduler](o3, tc, 10, True)
    first = O.SCHEDULERS[tc.scheduler](opt(), tc, 10, True)
    for _ in range(23):
        first.step()
    again.load_state_dict(first.state_dict())
    again.step()
    assert o3.param_groups[0]["lr"] == pytest.approx(want[24])
    # scheduler_args reach timm: three cosine cycles of 10 updates each, the lr back at the top at each start
    tc = load_config(None, ["train.lr=0.1", "train.epochs=1", "train.scheduler=timm.cosine",
                            "train.scheduler_args={cycle_limit: 3, cycle_decay: 1.0}"]).train
    o4 = opt()
    sched = O.SCHEDULERS[tc.scheduler](o4, tc, 10, True)
    seen = []
    for _ in range(30):
        sched.step()
        seen.append(o4.param_groups[0]["lr"])
    assert seen[9] == pytest.approx(0.1) and seen[19] == pytest.approx(0.1) and seen[8] < 0.01


def test_a_timm_scheduler_trains_a_fold_and_unknown_names_are_refused(workdir):
    from pipeline.config.loading import ConfigError, load_config

    T.run(tiny_cfg(workdir / "comp", "train.folds=[0]", "train.epochs=2", "train.scheduler=timm.tanh", name="tanh"))
    lrs = pd.read_csv("models/tanh/fold0/log.csv")["lr"].tolist()
    assert len(lrs) == 2 and lrs[1] < lrs[0]
    with pytest.raises(ConfigError, match="timm.cosine"):
        load_config(None, ["train.scheduler=timm.nope"])


def test_restarts_save_a_snapshot_per_cycle(workdir):
    T.run(tiny_cfg(workdir / "comp", "train.folds=[0]", "train.epochs=4", "train.scheduler=restarts",
                   "train.cycle_epochs=2"))
    assert sorted(p.name for p in (workdir / "models/tiny/fold0").glob("snapshot_*.pt")) == ["snapshot_e2.pt", "snapshot_e4.pt"]


def test_discriminative_lr_groups(workdir):
    cfg = tiny_cfg(workdir / "comp", "train.backbone_lr_mult=0.1", "train.lr=0.01", "train.scheduler=none")
    from pipeline.competition.tables import load_train
    from pipeline.training.models import heads_for

    df = load_train(cfg)
    tr = TR.FoldTrainer(cfg, heads_for(cfg, df), df, np.arange(60), np.arange(60, 90), 0, workdir / "x", "k", "h")
    assert [g["lr"] for g in tr.opt.param_groups] == [pytest.approx(0.001), pytest.approx(0.01)]


def test_multiscale_feeds_sizes_from_the_list(workdir):
    cfg = tiny_cfg(workdir / "comp", "train.folds=[0]", "train.epochs=2", "train.multiscale=[12, 20]")
    seen = set()
    orig = torch.nn.functional.interpolate

    def spy(x, size=None, **kw):
        seen.add(tuple(size) if size else None)
        return orig(x, size=size, **kw)

    torch.nn.functional.interpolate = spy
    try:
        T.run(cfg)
    finally:
        torch.nn.functional.interpolate = orig
    assert seen == {(12, 12), (20, 20)}  # both sizes drawn over the run's 8 batches, nothing else


def test_bad_inputs_are_named(workdir):
    with pytest.raises(InputError, match="unknown timm model 'resnet_18'.*resnet18"):
        T.run(tiny_cfg(workdir / "comp", "model.backbone=resnet_18"))
    with pytest.raises(InputError, match="outside the declared classes 0..1"):
        T.run(tiny_cfg(workdir / "comp", "competition.num_classes=2", "folds.method=group"))
    with pytest.raises(InputError, match=r"train.folds names fold\(s\) \[7\], but the folds file has folds 0..2"):
        T.run(tiny_cfg(workdir / "comp", "train.folds=[0, 7]"))
    with pytest.raises(InputError, match="unknown albumentations transform 'HorizontalFlp'.*HorizontalFlip"):
        T.run(tiny_cfg(workdir / "comp", "train.augment=[HorizontalFlp]"))
    (workdir / "comp/images/r00003.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="r00003.png cannot be read"):
        T.run(tiny_cfg(workdir / "comp", name="bad"))


def test_local_weights_load_with_report_and_mismatch_refused(workdir, tmp_path):
    cfg = tiny_cfg(workdir / "comp")
    net = build_model_for(cfg)
    torch.save({"model": {f"backbone.{k}": v for k, v in net.backbone.state_dict().items()}}, tmp_path / "w.pt")
    other = build_model_for(cfg)
    rep = load_backbone_weights(other.backbone, tmp_path / "w.pt")
    assert rep.matched == rep.total and not rep.missing
    assert torch.equal(other.backbone.conv1[0].weight, net.backbone.conv1[0].weight)
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="does not fit backbone"):
        load_backbone_weights(other.backbone, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="no download is ever attempted"):
        load_backbone_weights(other.backbone, tmp_path / "missing.pt")


def test_ddp_two_cpu_processes_with_gloo(workdir):
    tiny_cfg(workdir / "comp")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline", "train",
            "--defaults", f"competition.root={workdir / 'comp'}", "competition.group=grp", "folds.file=folds/{competition}.csv",
            "data.in_chans=1", "data.image_size=16", "name=ddp", "model.backbone=test_resnet", "train.epochs=2",
            "train.batch_size=8", "folds.n_splits=3", "train.folds=[0]", "train.sync_bn=true",
            "train.freeze_backbone_epochs=1"]  # a head-only first epoch: parameters frozen after DDP is built
    run = subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "DDP world size 2" in run.stdout
    assert "[train] fold 0: the 2 DDP processes end with the same weights" in run.stdout  # an all_reduce check
    assert run.stdout.count("[train] fold 0 epoch 2/2") == 1  # one process writes and reports
    log = pd.read_csv(workdir / "models/ddp/fold0/log.csv")
    assert len(log) == 2 and log["score"].notna().all()
    net, ck = load_model(workdir / "models/ddp/fold0/best.pt")
    assert not any(k.startswith("module.") for k in ck.weights)


def test_lr_finder_writes_plot_and_a_sane_suggestion(workdir, capsys):
    cfg = tiny_cfg(workdir / "comp", "lr_find.steps=40", "lr_find.start=1e-5", "lr_find.end=10")
    png = LF.run(cfg)
    assert png.read_bytes()[:4] == b"\x89PNG"
    df = pd.read_csv(workdir / "models/tiny/lr_find.csv")
    import re

    lr = float(re.search(r"steepest descent at lr (\S+)", capsys.readouterr().out).group(1))
    assert df["lr"].iloc[0] < lr < df["lr"].iloc[-1]
    assert df["lr"].is_monotonic_increasing and 1e-5 <= df["lr"].iloc[0] < df["lr"].iloc[-1] <= 10
    assert df["smoothed"].min() < 0.5 * df["smoothed"].iloc[0]  # the sweep reached lrs that learn


def _one_fold(workdir, *over, name="opt"):
    cfg = tiny_cfg(workdir / "comp", "train.folds=[0]", "train.epochs=1", *over, name=name)
    T.run(cfg)
    return cfg, torch.load(f"models/{name}/fold0/last.pt", map_location="cpu", weights_only=True)


def test_pooling_and_neck_options(workdir):
    cfg = tiny_cfg(workdir / "comp")
    heads = [Head("target", ["target"], "multiclass", 3)]
    gem = build_model(cfg.updated({"model.pool": "gem"}), heads)
    avg = build_model(cfg, heads)
    x = torch.rand(2, 96, 3, 3) + 0.1
    gem.pool.gem.p.data.fill_(1.0)
    assert torch.allclose(gem.pool(x), avg.pool(x), atol=1e-5)  # GeM with p=1 is average pooling
    _, ck = _one_fold(workdir, "model.pool=gem", "train.lr=0.05")
    assert ck["model"]["pool.gem.p"].item() != 3.0  # p is learned
    am = build_model(cfg.updated({"model.pool": "avgmax"}), heads)
    assert am.embed_dim == 2 * am.backbone.num_features and am.heads["target"].in_features == am.embed_dim
    bn = build_model(cfg.updated({"model.bnneck": True}), heads)
    assert isinstance(bn.neck, torch.nn.BatchNorm1d) and not bn.neck.bias.requires_grad
    dr = build_model(cfg.updated({"model.dropout": 0.5}), heads)
    xi = torch.rand(4, 1, 16, 16)
    dr.train()
    assert not torch.equal(dr(xi)["target"], dr(xi)["target"])
    dr.eval()
    assert torch.equal(dr(xi)["target"], dr(xi)["target"])


def test_auxiliary_and_vector_heads_train_with_their_own_outputs(workdir):
    _one_fold(workdir, "competition.aux_targets=[tab, {name: vec, columns: [tab, grp], task: vector}]",
              "train.loss_weights={tab: 0.5, vec: 0.1}")
    valid = pd.read_parquet("models/opt/fold0/best_valid.parquet")
    assert {"target__0", "target__2", "tab__0", "vec__0", "vec__1"} <= set(valid.columns)
    ck = torch.load("models/opt/fold0/best.pt", map_location="cpu", weights_only=True)
    assert {h["name"]: (h["kind"], h["weight"]) for h in ck["heads"]} == {
        "target": ("multiclass", 1.0), "tab": ("regression", 0.5), "vec": ("vector", 0.1)}


def _lamb():
    from timm.optim import Lamb

    return Lamb


@pytest.mark.parametrize("opt,cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                     ("lamb", "timm"), ("lion", "timm")])
def test_optimizers(workdir, opt, cls):
    """Every timm optimizer is a train.optimizer (timm's create_optimizer_v2 builds it)."""
    if cls == "timm":
        from timm.optim._optim_factory import default_registry

        cls = default_registry.get_optimizer_info(opt).opt_class
    cfg = tiny_cfg(workdir / "comp", f"train.optimizer={opt}")
    from pipeline.competition.tables import load_train
    from pipeline.training.models import heads_for

    df = load_train(cfg)
    tr = TR.FoldTrainer(cfg, heads_for(cfg, df), df, np.arange(60), np.arange(60, 90), 0, workdir / "x", "k", "h")
    assert type(tr.opt) is cls
    assert tr.opt.param_groups[0]["lr"] == pytest.approx(cfg["train"]["lr"])
    from pipeline.config.loading import DEFAULTS

    assert (DEFAULTS["train"]["optimizer"], DEFAULTS["train"]["lr"]) == ("adam", 3e-4)


def test_sgd_without_momentum_is_plain_sgd(workdir):
    cfg = tiny_cfg(workdir / "comp", "train.optimizer=sgd", "train.momentum=0")
    from pipeline.competition.tables import load_train
    from pipeline.training.models import heads_for

    df = load_train(cfg)
    tr = TR.FoldTrainer(cfg, heads_for(cfg, df), df, np.arange(60), np.arange(60, 90), 0, workdir / "x", "k", "h")
    assert type(tr.opt) is torch.optim.SGD and not tr.opt.param_groups[0]["nesterov"]


def test_layer_decay_scales_each_timm_layer_group_and_keeps_the_heads_at_lr(workdir):
    """train.layer_decay=0.5 on resnet10t (timm groups: stem, then each block): the deepest block trains at
    lr * backbone_lr_mult, each group below at half the one above, the heads at lr."""
    cfg = tiny_cfg(workdir / "comp", "train.layer_decay=0.5", "train.lr=0.01", "train.backbone_lr_mult=0.5",
                   "train.scheduler=none")
    from pipeline.competition.tables import load_train
    from pipeline.training.models import heads_for

    df = load_train(cfg)
    tr = TR.FoldTrainer(cfg, heads_for(cfg, df), df, np.arange(60), np.arange(60, 90), 0, workdir / "x", "k", "h")
    groups = tr.opt.param_groups
    group_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(tr.model.named_parameters())
    stem, first, last = (group_of[id(named[n])] for n in ("backbone.conv1.0.weight", "backbone.layer1.0.conv1.weight",
                                                          "backbone.layer4.0.conv1.weight"))
    head = group_of[id(named[next(n for n in named if not n.startswith("backbone."))])]
    assert head == pytest.approx(0.01)
    assert last == pytest.approx(0.005)  # lr * backbone_lr_mult, the top layer group
    assert stem < first < last and first == pytest.approx(stem * 2)
    assert sum(len(g["params"]) for g in groups) == len([p for p in tr.model.parameters() if p.requires_grad])


def test_grad_clip_bounds_the_update(workdir):
    _, raw = _one_fold(workdir, "train.optimizer=sgd", "train.momentum=0", "train.lr=100", "train.scheduler=none",
                       "train.batch_size=64", name="noclip")
    cfg = tiny_cfg(workdir / "comp")
    init = build_model_for(cfg).state_dict()
    _, clipped = _one_fold(workdir, "train.optimizer=sgd", "train.momentum=0", "train.lr=100", "train.scheduler=none",
                           "train.batch_size=64", "train.grad_clip=0.001", name="clip")
    delta = lambda st: torch.sqrt(sum(((st[k].float() - init[k].float()) ** 2).sum() for k in init
                                      if k.endswith("weight") and "bn" not in k and st[k].dtype.is_floating_point))
    assert delta(clipped["model"]) <= 100 * 0.001 * 1.01 * 2  # two steps (60-odd rows, batch 64) of norm <= lr*clip
    assert delta(raw["model"]) > 10 * delta(clipped["model"])


def test_plateau_cuts_lr_and_accumulation_halves_steps(workdir):
    T.run(tiny_cfg(workdir / "comp", "train.folds=[0]", "train.epochs=3", "train.scheduler=plateau", "train.lr=1e-6",
                   "train.patience=0", "train.gamma=0.5", name="plateau"))
    log = pd.read_csv("models/plateau/fold0/log.csv")
    lrs, scores = log["lr"].tolist(), log["score"].tolist()
    # patience 0, gamma 0.5: the epoch after one that does not improve the best score runs at half the lr
    # (the first score only sets the best); an improving epoch keeps it
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] == pytest.approx(lrs[0])
    improved = scores[1] > scores[0] * (1 + 1e-4)
    assert lrs[2] == pytest.approx(lrs[1] * (1.0 if improved else 0.5)), (lrs, scores)
    _, one = _one_fold(workdir, "train.batch_size=8", "train.scheduler=cosine", name="acc1")
    _, two = _one_fold(workdir, "train.batch_size=8", "train.scheduler=cosine", "train.accumulate=2", name="acc2")
    assert two["sched"]["last_epoch"] == (one["sched"]["last_epoch"] + 1) // 2


def test_channels_last_and_image_cache(workdir):
    cfg = tiny_cfg(workdir / "comp", "train.channels_last=true", "data.cache=true")
    from pipeline.competition.tables import load_train
    from pipeline.training.models import heads_for

    df = load_train(cfg)
    tr = TR.FoldTrainer(cfg, heads_for(cfg, df), df, np.arange(60), np.arange(60, 90), 0, workdir / "x", "k", "h")
    conv = next(p for p in tr.model.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert tr.train_ds._cache == {}
    tr.train_epoch(0)
    assert sorted(tr.train_ds._cache) == list(range(60))  # every training image was read once and kept
    before = tr.train_ds.image(5).copy()
    for p in (workdir / "comp" / "images").glob("r*.png"):
        p.unlink()
    assert (tr.train_ds.image(5) == before).all()  # served from memory: the file is gone
    tr.train_epoch(1)
    uncached = TR.FoldTrainer(tiny_cfg(workdir / "comp", "data.cache=false", "competition.check_images=false"),
                              heads_for(cfg, df), df, np.arange(60), np.arange(60, 90), 0, workdir / "y", "k", "h")
    assert uncached.train_ds._cache is None
    with pytest.raises(InputError, match="does not exist"):
        uncached.train_ds.image(5)


def test_cache_auto_keeps_images_that_fit_in_a_quarter_of_free_memory(workdir, monkeypatch):
    from pipeline.competition import images
    from pipeline.competition.tables import load_train
    from pipeline.training.models import heads_for

    cfg = tiny_cfg(workdir / "comp")
    assert cfg["data"]["cache"] == "auto"  # the default
    df = load_train(cfg)

    def trainer():
        return TR.FoldTrainer(cfg, heads_for(cfg, df), df, np.arange(60), np.arange(60, 90), 0, workdir / "x", "k", "h")

    assert trainer().train_ds._cache == {}  # 90 16px images: a few KiB
    paths = [workdir / "comp" / "images" / f"{i}.png" for i in df["id"][:90]]
    need = sum(images.read_image(p, 1).nbytes for p in paths)
    assert images.decoded_bytes(paths, 1) == need  # estimated from file headers
    monkeypatch.setattr(images, "available_memory", lambda: 4 * need)  # exactly a quarter: still kept
    assert trainer().valid_ds._cache == {}
    monkeypatch.setattr(images, "available_memory", lambda: 4 * need - 1)
    tr = trainer()
    assert tr.train_ds._cache is None and tr.valid_ds._cache is None
    monkeypatch.setattr(images, "available_memory", lambda: None)  # unknown: read from disk
    assert trainer().train_ds._cache is None
    assert images.resolve_cache({**cfg["data"], "cache": True}, [])[0] is True  # forced on, whatever the memory
    monkeypatch.setattr(images, "available_memory", lambda: 10**12)
    import multiprocessing

    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    assert images.resolve_cache(cfg["data"], paths, workers=2)[0] is False  # spawned workers would copy it
    assert images.resolve_cache(cfg["data"], paths, workers=0)[0] is True


def test_cache_auto_counts_the_folds_that_make_trains_in_parallel(workdir, monkeypatch):
    """`make -j4 train` runs four fold processes at once, each with its own cache: auto must leave room for all."""
    from pipeline.competition import images

    paths = sorted((workdir / "comp" / "images").glob("*.png"))[:40]
    need = images.decoded_bytes(paths, 1)
    data = {"cache": "auto", "in_chans": 1}
    monkeypatch.setattr(images, "available_memory", lambda: 4 * need)  # room for exactly one process's cache
    for flags, jobs in (("", 1), ("k", 1), (" -j4 --jobserver-auth=3,4", 4), ("k -j2 --jobserver-auth=3,4", 2),
                        (" -j1", 1), (" --jobserver-auth=fifo:/tmp/f -j12", 12)):
        monkeypatch.setenv("MAKEFLAGS", flags)
        assert images.parallel_jobs() == jobs, flags
        keep, why = images.resolve_cache(data, paths)
        assert keep is (jobs == 1) and f"x {jobs} process(es)" in why, (flags, why)
    monkeypatch.setenv("MAKEFLAGS", " -j")  # no limit: one per core
    assert images.parallel_jobs() == (os.cpu_count() or 1)


def test_stage_keys_ignore_how_images_are_read_and_match_keys_from_before_cache_auto(workdir):
    from pipeline.store.io import config_hash

    cfg = tiny_cfg(workdir / "comp")
    keys = {FM.stage_key(tiny_cfg(workdir / "comp", *o), "f", "t") for o in
            ([], ["data.cache=true"], ["data.cache=false"], ["data.num_workers=3"])}
    assert len(keys) == 1
    # the key before cache=auto, normalize, jpeg_draft, model.pretrained, layer_decay, the margin heads and the
    # asymmetric loss's options existed:
    # models trained then stay up to date while those keep their defaults
    old = {k: v for k, v in cfg["data"].model_dump().items()
           if k not in ("num_workers", "normalize", "jpeg_draft")} | {"cache": False}
    model = {k: v for k, v in cfg["model"].model_dump().items() if k != "pretrained" and not k.startswith("head")}
    train = {k: v for k, v in cfg["train"].model_dump().items()
             if k not in (*FM.RUN_ONLY, "ema_warmup", "layer_decay", "scheduler_args") and not k.startswith("asl_")}
    comp = {k: v for k, v in cfg["competition"].model_dump().items() if k not in ("train_image", "test_image", "path_column")}
    assert keys == {config_hash([comp, old, model, train, cfg["seed"], "f", "t"])}
    for changed in ("data.normalize=imagenet", "data.jpeg_draft=false", "train.layer_decay=0.7", "model.head=arcface",
                    "train.scheduler_args={cycle_limit: 2}"):
        assert FM.stage_key(tiny_cfg(workdir / "comp", changed), "f", "t") not in keys, changed
    assert FM.stage_key(tiny_cfg(workdir / "comp", "data.image_size=20"), "f", "t") not in keys


def test_the_default_configs_train_key_is_the_one_of_the_previous_release():
    """A key added to the config with its default must not retrain anyone's models: the default config's
    train key is pinned to the one commit 6f47742 computed (checked against that tree, side by side)."""
    from pipeline.config.loading import load_config

    assert FM.stage_key(load_config(None, []), "f", "t", "i") == "630b81b7049a"


def test_ema_update_is_the_decayed_average_of_float_weights_and_copies_integer_buffers():

    from timm.utils.model_ema import ModelEmaV3

    from pipeline.training.averaging import ModelEma

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEma(net, decay=0.5)
    assert isinstance(ema, ModelEmaV3)  # timm's averaging, with our warm-up as its decay
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net.train()(torch.randn(4, 3))  # moves the running stats and num_batches_tracked
    ema.update(net)
    d = 0.5  # no warm-up: the target decay from the first update
    for k, v in ema.module.state_dict().items():
        want = net.state_dict()[k] if not v.dtype.is_floating_point else d * before[k] + (1 - d) * net.state_dict()[k]
        assert torch.allclose(v, want), k


def test_ema_warmup_reaches_the_target_decay_at_its_step_and_the_run_says_so(workdir, capsys):
    from pipeline.training.averaging import ModelEma, warmup_steps

    ema = ModelEma(torch.nn.Linear(2, 2), decay=0.99, warmup=20)
    ramp = [ema.decay_at(u) for u in range(1, 30)]
    assert ramp[18] < 0.99 and ramp[19] == pytest.approx(0.99) and max(ramp) == 0.99
    assert all(a <= b for a, b in zip(ramp, ramp[1:]))  # a ramp, never above the target
    assert warmup_steps("auto", 108) == 11 and warmup_steps(0, 108) == 0 and warmup_steps(50, 108) == 50
    # a short run (2 epochs of 4 steps): the decay the user asked for is the one in effect by the end
    T.run(tiny_cfg(workdir / "comp", "train.folds=[0]", "train.epochs=2", "train.ema=true", "train.ema_decay=0.9"))
    out = capsys.readouterr().out
    assert "EMA decay 0.9 reached after 1 of 8 optimizer steps (train.ema_warmup=auto); WARNING: decay 0.9" in out, out
    assert ModelEma(torch.nn.Linear(2, 2), 0.9).horizon_warning(108) == ""
    assert "epoch 2/2" in out and out.split("epoch 2/2")[1].splitlines()[0].count("ema_decay 0.9 ") == 1


def test_preloaded_cache_is_shared_with_loader_workers(tmp_path):
    from PIL import Image

    from pipeline.competition.images import ImageDataset, build_transform

    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(paths[-1])
    ds = ImageDataset(paths, 1, build_transform({"image_size": 8, "in_chans": 1, "mean": None, "std": None}),
                      {"target": np.arange(6)}, cache=True)
    ds.preload(threads=2)
    for p in paths:  # from now on only the cache can serve the images
        p.unlink()
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    x = torch.cat([b[0] for b in loader])
    assert torch.allclose(x[:, 0, 0, 0], torch.tensor([40 * i / 127.5 - 1 for i in range(6)]), atol=1e-4)


def test_loader_workers_draw_different_augmentations_reproducibly(tmp_path):
    from PIL import Image

    from pipeline.competition.images import ImageDataset, build_transform, seed_worker

    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(tmp_path / "a.png")
    transform = build_transform({"image_size": 16, "in_chans": 1, "mean": None, "std": None},
                                [{"Affine": {"rotate": [-30, 30], "p": 1.0}}], seed=0)

    def epoch():
        ds = ImageDataset([tmp_path / "a.png"] * 8, 1, transform, {"target": np.zeros(8, int)})
        ds.set_epoch(5)
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, worker_init_fn=seed_worker,
                                             generator=torch.Generator().manual_seed(5))
        return torch.cat([b[0] for b in loader])

    x = epoch()  # batches alternate between worker 0 and worker 1
    assert not torch.allclose(x[0], x[1]) and not torch.allclose(x[2], x[3])
    assert torch.equal(x, epoch())


def test_valid_from_scores_only_the_later_epochs_and_the_best_comes_from_them(workdir):
    T.run(tiny_cfg(workdir / "comp", "train.folds=[0]", "train.epochs=3", "train.valid_from=3"))
    log = pd.read_csv(workdir / "models/tiny/fold0/log.csv")
    assert log["score"].isna().tolist() == [True, True, False]
    assert torch.load(workdir / "models/tiny/fold0/best.pt", weights_only=True)["epoch"] == 3


def test_training_curves_leave_out_epochs_that_were_not_scored():
    from pipeline.store.plots import curves

    logs = pd.DataFrame({"fold": [0, 0, 0, 1, 1, 1], "epoch": [1, 2, 3] * 2, "train_loss": [3.0, 2.0, 1.0] * 2,
                         "valid_loss": [np.nan, np.nan, 0.5] * 2, "score": [np.nan, np.nan, 0.9] * 2})
    fig = curves(logs, "accuracy", "t")
    score_line = fig.axes[2].get_lines()[0]
    assert list(score_line.get_xdata()) == [3] and list(score_line.get_ydata()) == [0.9]
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [1, 2, 3]


def test_train_check_answers_up_to_date_only_when_every_fold_is(workdir):
    from pipeline.__main__ import main

    args = [f"competition.root={workdir / 'comp'}", "competition.group=grp", "competition.tabular=[tab]",
            "folds.file=folds/{competition}.csv", "data.in_chans=1", "data.image_size=16", "name=tiny", *TINY,
            "train.epochs=1"]
    cfg = tiny_cfg(workdir / "comp", "train.epochs=1")
    assert main(["train", "--check", *CFG, *args]) == 1
    assert not (workdir / "models").exists()  # a check writes nothing
    T.run(cfg)
    assert main(["train", "--check", *CFG, *args]) == 0
    assert main(["train", "--check", "--force", *CFG, *args]) == 1
    assert main(["train", "--check", *CFG, *args, "train.lr=0.01"]) == 1  # another config would retrain
    assert main(["train", "--check", *CFG, *args, "train.folds=[1]"]) == 0
    assert main(["train", "--check", *CFG, *args, "data.cache=false", "data.num_workers=1"]) == 0  # how images are read
    assert main(["features", "--check", *CFG, *args]) == 1  # no cheap answer: running it is how to find out


def test_each_loader_is_iterated_once_so_its_workers_start_once_per_epoch(workdir, monkeypatch):
    """tqdm.auto's bar calls iter() on what it wraps when it is made; wrapped around the training loader, each
    epoch started the loader's workers twice (the first set prefetched batches for nothing)."""
    from torch.utils.data import DataLoader

    seen, real_iter = {}, DataLoader.__iter__

    def counting_iter(self):
        seen.setdefault(id(self), [self, 0])[1] += 1  # the loader is kept alive, so its id is not reused
        return real_iter(self)

    import tqdm.auto

    closed = []

    class RecordingBar(tqdm.auto.tqdm):  # the bar counts batches itself now: it must still end full
        def close(self):
            if not self.disable:
                closed.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(DataLoader, "__iter__", counting_iter)
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    _one_fold(workdir, "train.epochs=2", "data.num_workers=1", name="iter_once")
    counts = [n for _, n in seen.values()]
    # with workers, one training and one validation loader per fold (their workers persist), each iterated
    # once per epoch
    assert counts == [2, 2], counts
    assert len(closed) >= 2 and all(n == total > 0 for n, total in closed), closed  # a notebook shows the rest in red


# model.freeze_stages=1 and =2 per family: (first parameter that must be frozen, first that must train)
FAMILIES = {
    "resnet18": ("layer1.0.conv1.weight", "layer2.0.conv1.weight", "layer3.0.conv1.weight"),
    "efficientnet_b0": ("blocks.0.0.conv_dw.weight", "blocks.1.0.conv_pw.weight", "blocks.2.0.conv_pw.weight"),
    "convnext_atto": ("stages.0.blocks.0.conv_dw.weight", "stages.1.downsample.0.weight", "stages.2.downsample.0.weight"),
    "mobilenetv3_small_100": ("blocks.0.0.conv_dw.weight", "blocks.1.0.conv_pw.weight", "blocks.2.0.conv_pw.weight"),
    "vit_tiny_patch16_224": ("blocks.0.norm1.weight", "blocks.1.norm1.weight", "blocks.2.norm1.weight"),
}


@pytest.mark.parametrize("backbone", sorted(FAMILIES))
def test_freeze_stages_follows_timms_grouping_of_each_family(backbone):
    """freeze_stages=N freezes the stem and the first N of timm's stage groups, in every family (cutting names at
    the first dot froze 90% of efficientnet_b0 and all of convnext_atto); the deepest stages keep training."""
    from pipeline.training.models import create_backbone, freeze_stages

    first, second, third = FAMILIES[backbone]
    for n, frozen_up_to, trains_from in ((1, first, second), (2, second, third)):
        net = create_backbone(backbone, 3, 32 if "vit" in backbone else None)
        frozen = freeze_stages(net, n)
        params = dict(net.named_parameters())
        order = list(params)
        assert not params[frozen_up_to].requires_grad and params[trains_from].requires_grad, (backbone, n)
        # frozen = a prefix of the parameters, from the input: everything before `trains_from`, nothing after
        assert frozen == set(order[:order.index(trains_from)])
        assert all(params[p].requires_grad for p in order[order.index(trains_from):])
        share = sum(params[p].numel() for p in frozen) / sum(p.numel() for p in params.values())
        assert share < 0.5, (backbone, n, share)  # a stage or two of a deep net, not most of it
