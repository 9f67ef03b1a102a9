"""``make kaggle``: a bundle that a fresh, offline, Kaggle-like Python turns into the submission `make submit` wrote.

The demo chain runs once (module fixture, short training) in a scratch project, as `make` runs it: the
level-1 experiment demo-resnet submitted on its own, and demo-stack (LightGBM over demo-resnet and
demo-small) post-processed and submitted; each is bundled with `make kaggle`. The notebook test then
makes a new virtual environment holding only what Kaggle's image preinstalls (linked from this one: no
5 GB reinstall), lays the bundle and the competition out read-only under an ``input/`` root, runs
``inference.ipynb`` headless with nbclient, and compares its submission with `make submit`'s.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import InputError
from pipeline.kaggle import wheels as W
from pipeline.kaggle.inference import predict, predict_bundle
from pipeline.level2 import models as L2

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
TINY = "train.epochs=1 model.backbone=test_resnet folds.n_splits=3 features.tta=hflip features.stats=[mean,var]"
# preinstalled in Kaggle's Python image (Kaggle/docker-python installed_cpu_packages.txt), ipykernel to run it
KAGGLE_IMAGE = ("torch", "torchvision", "timm", "numpy", "pandas", "scikit-learn", "lightgbm", "albumentations",
                "scipy", "pillow", "pyyaml", "matplotlib", "pyarrow", "tqdm", "pydantic", "ipykernel")


def _make(project: Path, *args: str, overrides: str = TINY) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["make", "--no-print-directory", *args, f"VENV={VENV}", f"ARGS={overrides}"], cwd=project,
                         env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def _project(tmp_path_factory, name: str = "project") -> Path:
    project = tmp_path_factory.mktemp(name)
    for item in ("Makefile", "configs", "requirements.txt", "pyproject.toml"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, project / item)
    for item in ("requirements.txt", "pyproject.toml"):  # older than the venv's stamp: `make setup` does nothing
        os.utime(project / item, (0, 0))
    return project


# an RGB JPEG competition in Kaggle's layout (train_images/ beside test_images/), an ImageNet-normalised
# net: its own config file, as a user writes one
RGB_CONFIG = """name: rgb
competition: {{name: rgb, root: {root}, id: image_id, target: label, group: site,
  train_image: "train_images/{{id}}.jpg", test_image: "test_images/{{id}}.jpg"}}
folds: {{n_splits: 3}}
data: {{in_chans: 3, image_size: 32, normalize: imagenet}}
model: {{backbone: test_resnet}}
train: {{epochs: 2, batch_size: 16, lr: 0.003}}
features: {{batch_size: 32}}
stack: {{model: weighted}}
"""


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    from tests.test_layouts import split_competition

    project = _project(tmp_path_factory, "rgb")
    root = split_competition(project / "comp")
    (project / "configs" / "rgb.yaml").write_text(RGB_CONFIG.format(root=root))
    _make(project, "folds", "train", "stack", "submit", "CONFIG=configs/rgb.yaml", overrides="")
    _make(project, "kaggle", "CONFIG=configs/rgb.yaml", overrides="")
    return project, root


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    project = _project(tmp_path_factory)
    _make(project, "stack", "postprocess", "submit", "CONFIG=configs/demo-stack.yaml")
    _make(project, "submit", "CONFIG=configs/demo.yaml")  # demo-resnet alone (level 1)
    out = {"demo-resnet": _make(project, "kaggle", "CONFIG=configs/demo.yaml", "EXP=demo-resnet"),
           "demo-stack-pp": _make(project, "kaggle", "CONFIG=configs/demo-stack.yaml"),  # EXP: what submit submits
           "again": _make(project, "kaggle", "CONFIG=configs/demo-stack.yaml")}
    return project, out


# ------------------------------------------------------------------------- a Kaggle-like Python
def _closure(names) -> set[str]:
    """The distributions ``names`` need, as installed here (extras left out)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            lines = metadata.requires(name) or []
        except metadata.PackageNotFoundError:  # a requirement for another platform
            continue
        for line in lines:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


@pytest.fixture(scope="module")
def image_links(tmp_path_factory) -> Path:
    """A folder of links to exactly the preinstalled distributions (and what they need) of this venv."""
    links = tmp_path_factory.mktemp("kaggle-image")
    for name in sorted(_closure(KAGGLE_IMAGE)):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for top in {Path(f).parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if not (links / top).exists() and Path(dist.locate_file(top)).exists():
                (links / top).symlink_to(dist.locate_file(top))
    return links


def kaggle_python(tmp_path: Path, links: Path) -> Path:
    venv = tmp_path / "kaggle-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "kaggle-image.pth").write_text(f"{links}\n")
    return venv / "bin" / "python"


def _kernel_env(python: Path, input_dir: Path, working: Path) -> dict:
    """The kernel's environment: no pip configuration or index, no path to this repository."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "JUPYTER", "KAGGLE_"))}
    env.update(PATH=f"{python.parent}:{env['PATH']}", PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1",
               KAGGLE_INPUT_DIR=str(input_dir), KAGGLE_WORKING_DIR=str(working), OMP_NUM_THREADS="1")
    return env


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in [root, *root.rglob("*")]}


def _read_only(root: Path, on: bool) -> None:
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            p.chmod((0o555 if p.is_dir() else 0o444) if on else (0o755 if p.is_dir() else 0o644))


def assert_same_submission(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same ids in the same order; labels equal, probabilities within 1e-5."""
    assert list(got.columns) == list(want.columns)
    assert got.iloc[:, 0].astype(str).tolist() == want.iloc[:, 0].astype(str).tolist()
    for c in want.columns[1:]:
        if want[c].dtype.kind == "f":
            np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), rtol=0, atol=1e-5)
        else:  # (an empty label set is an empty cell: NaN on reading)
            assert got[c].fillna("").tolist() == want[c].fillna("").tolist(), c


@pytest.mark.parametrize("source", ["demo-resnet", "demo-stack-pp"])
def test_notebook_in_a_fresh_offline_env_writes_the_submission_make_submit_wrote(demo, image_links, tmp_path,
                                                                                 monkeypatch, source):
    project, _ = demo
    run_notebook(project / "kaggle" / source, project / "data" / "demo", project / f"submissions/{source}.csv",
                 image_links, tmp_path, monkeypatch)


def test_an_rgb_jpeg_competition_runs_make_and_the_offline_notebook(rgb, image_links, tmp_path, monkeypatch):
    """`make folds train stack submit` on RGB JPEGs in train_images/ and test_images/, then the notebook."""
    project, root = rgb
    sub = pd.read_csv(project / "submissions" / "rgb-l2.csv")
    solution = pd.read_csv(root / "solution.csv")
    accuracy = float((sub["label"].to_numpy() == solution["label"].to_numpy()).mean())
    assert accuracy > 0.6, accuracy  # colour classes: a model that learned nothing scores ~0.33
    run_notebook(project / "kaggle" / "rgb-l2", root, project / "submissions" / "rgb-l2.csv", image_links, tmp_path,
                 monkeypatch)
    # ... from the very probabilities features wrote: the bundle preprocesses with the checkpoint's
    # normalisation (imagenet here), not the default 0.5
    _, sets = predict(project / "kaggle" / "rgb-l2", root, device="cpu")
    ours = pd.read_parquet(project / "features" / "rgb" / "test.parquet")
    cols = [c for c in ours.columns if c != "image_id"]
    np.testing.assert_allclose(sets["rgb"][cols].to_numpy(), ours[cols].to_numpy(), atol=1e-3)


def run_notebook(bundle: Path, competition_dir: Path, made: Path, image_links, tmp_path, monkeypatch) -> None:
    """Run a bundle's notebook headless in Kaggle's layout and offline; its submission must be ``made``."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat is needed to run the notebook (requirements.txt)")
    nbclient = pytest.importorskip("nbclient", reason="nbclient runs the notebook headless (requirements.txt)")
    pytest.importorskip("ipykernel", reason="ipykernel runs the notebook's kernel (requirements.txt)")
    source = bundle.name
    dataset = json.loads((bundle / "dataset-metadata.json").read_text())["id"].split("/")[1]
    kernel = json.loads((bundle / "kernel-metadata.json").read_text())
    competition = kernel["competition_sources"][0]
    assert kernel["machine_shape"] == "NvidiaTeslaT4" and kernel["enable_internet"] is False
    # Kaggle's layout: the dataset and the competition read-only under input/, outputs in working/
    input_dir, working = tmp_path / "kaggle" / "input", tmp_path / "kaggle" / "working"
    shutil.copytree(bundle, input_dir / dataset)
    shutil.copytree(competition_dir, input_dir / competition)
    working.mkdir()
    python = kaggle_python(tmp_path, image_links)
    env = _kernel_env(python, input_dir, working)
    probe = "import importlib.util as u; print([bool(u.find_spec(m)) for m in ('pipeline', 'ttach', 'lightgbm')])"
    assert subprocess.run([python, "-c", probe], env=env, capture_output=True, text=True, check=True
                          ).stdout.strip() == "[False, False, True]"  # ours and ttach can only come from the bundle
    kernels = tmp_path / "jupyter"
    (kernels / "kernels" / "kaggle").mkdir(parents=True)
    (kernels / "kernels" / "kaggle" / "kernel.json").write_text(json.dumps(
        {"argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "kaggle",
         "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(kernels))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    before = _tree(input_dir)
    _read_only(input_dir, True)
    try:
        nb = nbformat.read(bundle / "inference.ipynb", as_version=4)
        client = nbclient.NotebookClient(nb, kernel_name="kaggle", timeout=900,
                                         resources={"metadata": {"path": str(working)}})
        started = time.time()
        client.execute(env=env)
        elapsed = time.time() - started
    finally:
        _read_only(input_dir, False)
        after = _tree(input_dir)
    assert after == before  # nothing written next to the inputs (as root, the read-only bits alone prove nothing)
    assert sorted(p.name for p in working.iterdir()) == ["submission.csv"]
    site = next(python.parent.parent.glob("lib/python*/site-packages"))
    assert (site / "pipeline" / "kaggle" / "inference.py").exists() and (site / "ttach").is_dir()  # from the bundle
    assert_same_submission(pd.read_csv(working / "submission.csv"), pd.read_csv(made))
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"\n[kaggle test] {source}: bundle {size / 2**20:.1f} MiB, notebook ran in {elapsed:.1f}s "
          "(kernel start, pip install from the bundle, inference)")


def test_a_label_set_competition_runs_the_chain_and_the_offline_notebook(image_links, tmp_path, monkeypatch):
    """Multi-label with one column of space-separated labels: the chain, then the bundle's notebook offline
    writes the same labels back in that column."""
    from pipeline.config.loading import load_config
    from pipeline.metrics import get_metric
    from pipeline.stages import run_stage
    from tests.test_multilabel import LABELS, label_set_competition, overrides

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    root, truth = label_set_competition(tmp_path / "comp", "tags")
    over = [*overrides(work, root, "tags", "micro_f1"), "kaggle.source=ml-l2-pp"]
    for stage in ("folds", "train", "features", "stack", "postprocess", "submit", "kaggle"):
        run_stage(stage, load_config(None, over))
    made = work / "submissions" / "ml-l2-pp.csv"
    sub = pd.read_csv(made)
    assert set(" ".join(sub["tags"].fillna("")).split()) <= set(LABELS)
    pred = np.array([[c in str(cell).split() for c in LABELS] for cell in sub["tags"]], dtype=float)
    score, everything = get_metric("micro_f1")(truth, pred), get_metric("micro_f1")(truth, np.ones_like(pred))
    print(f"\n[multilabel] micro-F1 of the submission on solution.csv: {score:.4f} (every label: {everything:.4f})")
    assert score > everything + 0.15
    run_notebook(work / "kaggle" / "ml-l2-pp", root, made, image_links, tmp_path, monkeypatch)


# ------------------------------------------------------------------------- what a bundle holds
def test_make_kaggle_bundles_what_inference_needs_and_says_so(demo):
    project, out = demo
    bundle = project / "kaggle" / "demo-stack-pp"
    assert sorted(p.name for p in (bundle / "wheels").iterdir()) == ["pipeline-0.1.0-py3-none-any.whl",
                                                                    "ttach-0.0.3-py3-none-any.whl"]  # never torch
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert list(manifest["sets"]) == ["demo-resnet", "demo-small", "demo-stack", "demo-stack-pp"]  # dependency order
    assert manifest["sets"]["demo-resnet"]["features"]["tta"] == "hflip"
    import torch

    ckpt = torch.load(bundle / "models/demo-small/fold2.pt", map_location="cpu", weights_only=True)
    assert set(ckpt) <= {"format", "model", "heads", "model_cfg", "data_cfg", "fold", "epoch", "score", "metric",
                         "stage_key"}
    assert ckpt["fold"] == 2 and ckpt["data_cfg"]["image_size"] == 24  # demo-small's own image size
    # stack saved its LightGBM models per fold; the bundle carries them with the tuned rules
    assert sorted(p.name for p in (project / "features/demo-stack/models").iterdir()) == [
        "fold0.txt", "fold1.txt", "fold2.txt", "level2.json"]
    assert (bundle / "level2/demo-stack/fold1.txt").read_text().startswith("tree")
    pp = json.loads((bundle / "postprocess/demo-stack-pp.json").read_text())
    assert pp["blend_with"] == "demo-resnet" and len(pp["params"]["class_scale"]) == 10
    meta = json.loads((bundle / "dataset-metadata.json").read_text())  # `kaggle datasets create` reads this
    assert meta["id"].endswith("/demo-demo-stack-pp") and meta["licenses"] == [{"name": "CC0-1.0"}]
    assert 6 <= len(meta["title"]) <= 50
    nb = json.loads((bundle / "inference.ipynb").read_text())
    code = "".join("".join(c["source"]) for c in nb["cells"])
    assert "--no-index" in code and "/kaggle/working" in code and "/kaggle/input" in code
    log = out["demo-stack-pp"]
    assert "[kaggle] verified" in log and "models/demo-resnet/fold0.pt" in log and "MiB" in log  # size + contents
    assert "[kaggle] up to date" in out["again"]  # the same sets, models and code: nothing is rebuilt


def test_bundle_reproduces_every_feature_sets_test_probabilities(demo, monkeypatch):
    project, _ = demo
    monkeypatch.chdir(project)
    sub, frames = predict("kaggle/demo-stack-pp", "data/demo")
    for name, frame in frames.items():
        made = pd.read_parquet(f"features/{name}/test.parquet")
        assert list(made["id"]) == list(frame["id"])
        cols = [c for c in frame.columns if c != "id"]
        assert cols == [c for c in made.columns if c != "id"], name
        np.testing.assert_allclose(frame[cols].to_numpy(float), made[cols].to_numpy(float), rtol=0, atol=1e-5)
    assert_same_submission(sub, pd.read_csv("submissions/demo-stack-pp.csv"))


def test_fp16_bundle_halves_the_checkpoints(demo, monkeypatch):
    from pipeline import load_config, run_stage

    project, _ = demo
    monkeypatch.chdir(project)
    cfg = load_config("configs/demo.yaml", TINY.split() + ["kaggle.source=demo-resnet", "kaggle.fp16=true",
                                                           "kaggle.output=kaggle/fp16"])
    out = run_stage("kaggle", cfg)  # verify: level 1 within 2e-2 of the fp32 features
    full, half = (Path(p) / "models/demo-resnet/fold0.pt" for p in ("kaggle/demo-resnet", out))
    assert half.stat().st_size < 0.6 * full.stat().st_size
    sub = pd.read_csv(predict_bundle(out, "data/demo", project / "fp16.csv"))
    agree = (sub["target"] == pd.read_csv("submissions/demo-resnet.csv")["target"]).mean()
    assert agree > 0.95


# ------------------------------------------------------------------------------------ bad input
@pytest.fixture
def copies(demo, tmp_path):
    project, _ = demo
    shutil.copytree(project / "kaggle" / "demo-stack-pp", tmp_path / "bundle")
    shutil.copytree(project / "data" / "demo", tmp_path / "comp")
    return tmp_path / "bundle", tmp_path / "comp"


def test_a_bundle_of_another_competition_is_refused_naming_the_columns(copies):
    bundle, comp = copies
    sample = pd.read_csv(comp / "sample_submission.csv")
    sample.rename(columns={"target": "label"}).to_csv(comp / "sample_submission.csv", index=False)
    with pytest.raises(InputError, match=r"sample_submission.csv: columns \['id', 'label'\] differ from \['id', "
                                         r"'target'\] of competition 'demo'.*another competition"):
        predict_bundle(bundle, comp, comp.parent / "sub.csv")
    sample.to_csv(comp / "sample_submission.csv", index=False)
    pd.read_csv(comp / "test.csv").drop(columns=["series"]).to_csv(comp / "test.csv", index=False)
    with pytest.raises(InputError, match=r"test.csv: column\(s\) \['series'\] that the bundle's models read are missing"):
        predict_bundle(bundle, comp, comp.parent / "sub.csv")
    assert not (comp.parent / "sub.csv").exists()


def test_a_missing_checkpoint_is_named(copies):
    bundle, comp = copies
    (bundle / "models/demo-small/fold1.pt").unlink()
    with pytest.raises(InputError, match="models/demo-small/fold1.pt is missing.*make kaggle"):
        predict_bundle(bundle, comp, comp.parent / "sub.csv")
    with pytest.raises(InputError, match="not a bundle"):
        predict_bundle(comp, comp, comp.parent / "sub.csv")


def test_test_images_missing_are_named(copies):
    bundle, comp = copies
    first = pd.read_csv(comp / "test.csv", dtype={"id": str})["id"].iloc[3]
    (comp / "images" / f"{first}.png").unlink()
    with pytest.raises(InputError, match=f"test.csv: 1 id\\(s\\) have no image file, e.g. id '{first}'"):
        predict_bundle(bundle, comp, comp.parent / "sub.csv")


def test_make_kaggle_refuses_a_missing_checkpoint_with_its_path(demo):
    project, _ = demo
    ckpt = project / "models/demo-small/fold0/best.pt"
    ckpt.rename(ckpt.with_suffix(".bak"))
    try:
        run = subprocess.run([sys.executable, "-m", "pipeline", "kaggle", "-c", "configs/demo-stack.yaml", *TINY.split()],
                             cwd=project, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    finally:
        ckpt.with_suffix(".bak").rename(ckpt)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "models/demo-small/fold0/best.pt: checkpoint of fold 0 of 'demo-small' is missing" in run.stderr


# ----------------------------------------------------------------- level 2 and wheels, unit level
class _Group:  # what stage_models needs of an ArtifactGroup: files written straight away
    def add(self, target, write):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        write(Path(target))

    def json(self, target, obj):
        self.add(target, lambda p: p.write_text(json.dumps(obj)))


@pytest.mark.parametrize("mode", ["mean", "refit"])
def test_saved_level2_predicts_test_rows_as_the_stack_did(tmp_path, mode):
    rng = np.random.default_rng(0)
    n, nt = 240, 60
    X = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n),
                      "s": pd.Categorical(rng.choice(["x", "y", "z"], n), categories=["x", "y", "z"])})
    y = (X["a"] > 0).astype(int).to_numpy() + (X["s"] == "z").to_numpy()
    T = pd.DataFrame({"a": rng.normal(size=nt), "b": rng.normal(size=nt),
                      "s": pd.Categorical(rng.choice(["x", "y", "z"], nt), categories=["x", "y", "z"])})
    scfg = {"model": "lgbm", "lgbm": {"n_estimators": 60, "min_child_samples": 5}, "test_mode": mode,
            "refit_coef": 1.0, "stat": "mean"}
    d = L2.Level2Data(X, T, y, np.arange(n) % 3, "multiclass", 3, ["e"], [], [], scfg, 0)
    result = L2.LEVEL2_MODELS["lgbm"](d)
    L2.stage_models(_Group(), tmp_path, d, result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold0.txt", "fold1.txt", "fold2.txt", "level2.json"] + (
        ["refit.txt"] if mode == "refit" else [])
    # a notebook's test frame: columns in another order, the categorical column as plain strings
    frame = T.assign(s=T["s"].astype(str))[["s", "b", "a"]]
    np.testing.assert_allclose(L2.predict_saved(tmp_path, frame), result.test, rtol=0, atol=1e-12)
    some = (T["s"] != "x").to_numpy()  # a test set without 'x': its category codes shift, the model maps them back
    np.testing.assert_allclose(L2.predict_saved(tmp_path, frame[some]), result.test[some], rtol=0, atol=1e-12)
    with pytest.raises(InputError, match=r"lack 1 column\(s\).*\['b'\]"):
        L2.predict_saved(tmp_path, frame.drop(columns=["b"]))


def test_wheels_are_those_kaggle_lacks_and_never_torch():
    reqs = W.applicable(["torch>=2.0", "timm>=0.9", "ttach>=0.0.3", "pydantic>=2", "pytest>=7; extra == 'test'"])
    assert [r.name for r in reqs] == ["torch", "timm", "ttach", "pydantic"]  # an extra's requirement is not bundled
    assert W.missing_on_kaggle(reqs) == {"ttach": metadata.version("ttach")}
    for never in ("nvidia-cublas", "triton"):
        with pytest.raises(InputError, match=f"'{never}' must come from the Kaggle image"):
            W.missing_on_kaggle(W.applicable([never]))


def test_a_time_budget_uses_fewer_models_then_views_and_says_so(demo, monkeypatch, capsys):
    project, _ = demo
    monkeypatch.chdir(project)
    manifest = json.loads(Path("kaggle/demo-stack-pp/bundle.json").read_text())
    torch_version = metadata.version("torch")
    assert manifest["versions"]["torch"] == torch_version and "lightgbm" in manifest["versions"]
    capsys.readouterr()
    sub, frames = predict("kaggle/demo-stack-pp", "data/demo", time_budget=1e-6)
    out = capsys.readouterr().out
    assert "package versions" in out and f"built with {torch_version}" in out
    assert "1 of 3 fold models fit" in out and "using the first 1 view(s)" in out
    assert len(sub) == len(pd.read_csv("data/demo/test.csv"))  # still a whole, validated submission
    full, _ = predict("kaggle/demo-stack-pp", "data/demo")
    name = next(n for n in frames if n == "demo-resnet")
    assert not np.allclose(frames[name].drop(columns="id").to_numpy(float),
                           _[name].drop(columns="id").to_numpy(float))  # it did predict with less


def test_known_bad_versions_stop_with_one_readable_line():
    from pipeline.kaggle import versions

    versions.check(installed={"albumentations": "2.0.8", "lightgbm": "4.7.0"})
    versions.check(installed={"albumentations": "1.4.21", "lightgbm": "3.3.5"})
    with pytest.raises(InputError, match=r"albumentations 1.4.20 has no Compose\(seed=\)"):
        versions.check(installed={"albumentations": "1.4.20"})
    with pytest.raises(InputError, match="lightgbm 4.1.0 cannot read"):
        versions.check(installed={"lightgbm": "4.1.0"})
    versions.check({"albumentations"}, installed={"lightgbm": "4.0.0"})  # a bundle without level 2 needs no lightgbm
    assert "built with 9.9" in versions.report({"torch": "9.9"})


def test_verify_refuses_a_bundle_that_does_not_reproduce_the_features_and_keeps_the_old_one(demo, monkeypatch):
    from pipeline.config.loading import load_config
    from pipeline.kaggle import inference as INF
    from pipeline.stages import run_stage

    project, _ = demo
    monkeypatch.chdir(project)
    before = Path("kaggle/demo-resnet/bundle.json").read_text()
    real = INF.level1_frame

    def drifted(*a, **k):  # as if the bundled checkpoints were not the ones the features came from
        frame = real(*a, **k)
        cols = [c for c in frame.columns if c != "id"]
        frame[cols] = frame[cols] + 0.01
        return frame

    monkeypatch.setattr(INF, "level1_frame", drifted)
    cfg = load_config("configs/demo.yaml", TINY.split() + ["kaggle.source=demo-resnet"])
    with pytest.raises(InputError, match=r"predicts the local test set differently \(max \|diff\| 0.01"):
        run_stage("kaggle", cfg, force=True)
    assert Path("kaggle/demo-resnet/bundle.json").read_text() == before  # the previous bundle is untouched
    assert not Path("kaggle/.demo-resnet.tmp").exists()
