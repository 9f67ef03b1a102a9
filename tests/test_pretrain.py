import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.stages import pretrain as P
from pipeline.stages import train as T
from tests.conftest import tiny_cfg


def test_permutation_set_is_deterministic_and_far_apart():
    a, b = P.permutation_set(100, 3, seed=0), P.permutation_set(100, 3, seed=0)
    assert np.array_equal(a, b) and a.shape == (100, 9)
    assert (a[0] == np.arange(9)).all()  # identity first
    assert len({tuple(r) for r in a}) == 100 and all(sorted(r) == list(range(9)) for r in a)
    assert P.min_hamming(a) >= 6
    assert P.min_hamming(P.permutation_set(24, 2)) == 2  # all 4! orders of a 2x2 grid
    with pytest.raises(InputError, match="more than the 24 possible orders of 4 tiles"):
        P.permutation_set(25, 2)


def test_puzzle_target_is_correct_for_a_known_permutation():
    img = torch.arange(6 * 6, dtype=torch.float32).reshape(1, 6, 6)
    perm = [2, 0, 1, 5, 3, 4, 8, 6, 7]
    out = P.shuffle_tiles(img, perm, grid=3)
    tile = lambda t: img[:, (t // 3) * 2:(t // 3) * 2 + 2, (t % 3) * 2:(t % 3) * 2 + 2]
    for pos, src in enumerate(perm):
        r, c = divmod(pos, 3)
        assert torch.equal(out[:, r * 2:r * 2 + 2, c * 2:c * 2 + 2], tile(src))
    gapped = P.shuffle_tiles(torch.rand(1, 9, 9), list(range(9)), grid=3, gap=1, offsets=[(0, 1)] * 9, tile_norm=True)
    assert gapped.shape == (1, 6, 6)
    assert torch.allclose(gapped[:, :2, :2].mean(), torch.tensor(0.0), atol=1e-5)  # per-tile normalisation


@pytest.mark.parametrize("formulation", ["permutation", "position"])
def test_tiny_pretrain_lowers_loss_and_weights_load_into_train(workdir, formulation, capsys):
    over = ["data.image_size=24", "pretrain.epochs=4", "pretrain.batch_size=16", "pretrain.lr=0.003",
            f"pretrain.formulation={formulation}", "pretrain.n_permutations=4", "pretrain.valid_fraction=0.2",
            "pretrain.dihedral=false"]
    cfg = tiny_cfg(workdir / "comp", *over)
    out = P.run(cfg)
    log = __import__("pandas").read_csv(out.parent / f"{out.stem}_run" / "log.csv")
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]
    state = torch.load(out, map_location="cpu")
    assert not any(k.startswith(("heads.", "backbone.")) for k in state)
    capsys.readouterr()
    T.run(tiny_cfg(workdir / "comp", *over, "train.epochs=1", "train.folds=[0]", f"model.init={out}",
                   "train.lr=1e-12", "train.optimizer=sgd", name="ft"))  # an lr that leaves the weights in place
    msg = capsys.readouterr().out
    n = len(state)
    assert f"loaded {n}/{n} backbone tensors from {out}" in msg  # every backbone key matched
    # the fine-tuned model really started from the pretrained backbone (not only a log line)
    ft = torch.load("models/ft/fold0/last.pt", map_location="cpu", weights_only=True)["model"]
    convs = [k for k, v in state.items() if v.ndim == 4]
    assert convs and all(torch.allclose(ft["backbone." + k], state[k]) for k in convs)


def test_bad_inputs(workdir):
    with pytest.raises(InputError, match="too small for a 3x3 grid"):
        P.run(tiny_cfg(workdir / "comp", "data.image_size=6", "pretrain.gap=1"))
    with pytest.raises(InputError, match="more than the 362880 possible"):
        P.run(tiny_cfg(workdir / "comp", "pretrain.n_permutations=400000"))
    bad = workdir / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2), "conv9.weight": torch.zeros(1)}, bad)
    with pytest.raises(InputError, match=r"does not fit backbone.*loaded 0/\d+.*missing .*bn1.*unexpected .*conv9.weight"):
        T.run(tiny_cfg(workdir / "comp", f"model.init={bad}", "train.folds=[0]"))


def test_pretrain_resumes_after_kill_9(workdir):
    import os
    import subprocess
    import sys

    tiny_cfg(workdir / "comp")
    args = [sys.executable, "-m", "pipeline", "pretrain", "--defaults", f"competition.root={workdir / 'comp'}",
            "competition.group=grp",
            "folds.file=folds/{competition}.csv", "data.in_chans=1", "data.image_size=24", "name=pz",
            "model.backbone=test_resnet", "pretrain.epochs=3", "pretrain.batch_size=16", "pretrain.valid_fraction=0.2"]
    killed = subprocess.run(args, cwd=workdir, capture_output=True, text=True,
                            env={**os.environ, "PIPELINE_KILL_AT": "epoch:1"})
    assert killed.returncode == -9
    again = subprocess.run(args, cwd=workdir, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout and "epoch 1/3" not in again.stdout and "epoch 3/3" in again.stdout
    assert (workdir / "models/pretrain/pz-test_resnet.pt").exists()
