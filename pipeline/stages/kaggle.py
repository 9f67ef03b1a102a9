"""``make kaggle EXP=<feature set>``: an offline bundle for a Kaggle code competition.

Builds ``kaggle/<name>/`` (``kaggle.output``), a folder to upload as a Kaggle dataset
(``kaggle datasets create -p kaggle/<name> --dir-mode zip``):

    wheels/                  this package, and every requirement Kaggle's image lacks (ttach); never torch
    models/<exp>/fold<k>.pt  each level-1 experiment's fold checkpoints: the validated-best (EMA/SWA) weights
                             only, no optimizer state; half precision with ``kaggle.fp16``
    level2/<stack>/          the LightGBM models ``stack`` saved (per fold, refit) and how to apply them
    postprocess/<set>.json   the post-processing parameters ``postprocess`` tuned
    configs/<set>.yaml       the resolved config each feature set was made with
    bundle.json              what to run, in order, and every file's size (checked before predicting)
    inference.ipynb          installs from wheels/ with --no-index, writes /kaggle/working/submission.csv
    dataset-metadata.json    for `kaggle datasets create`; kernel-metadata.json for `kaggle kernels push`

The source (``kaggle.source``, default: what ``submit`` submits) is followed back through what it was
made from: a post-processed set to its source and blend/force inputs, a stack to its experiments.
Before a new bundle replaces the old one, it predicts the local test set from its own files alone and
must reproduce each feature set's ``test.parquet`` (``kaggle.verify``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.competition.tables import class_labels, table_path
from pipeline.config.loading import yaml_load
from pipeline.errors import ConfigError, InputError
from pipeline.kaggle import versions
from pipeline.kaggle.inference import FORMAT, MANIFEST, predict
from pipeline.kaggle.wheels import build_wheels
from pipeline.level2.models import SAVED, SAVED_MODELS
from pipeline.store.artifacts import require_complete, stage_lock
from pipeline.store.io import config_hash, git_info, is_up_to_date, log, read_json, write_json
from pipeline.store.paths import features_dir, fold_dir, submission_source, under

if TYPE_CHECKING:
    from pipeline.config.schema import Config

METADATA = ("dataset-metadata.json", "kernel-metadata.json", "inference.ipynb")  # may be edited after the build


def run(cfg: Config, force: bool = False) -> Path:
    source = cfg.kaggle.source or submission_source(cfg)
    try:
        out = under(cfg, cfg.kaggle.output.format(name=source))
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"kaggle.output = {cfg.kaggle.output!r}: only {{name}} (the bundled feature set) "
                          f"can be filled in ({type(exc).__name__}: {exc}).") from None
    with stage_lock(out):
        return _build(cfg, source, out, force)


def _build(cfg: Config, source: str, out: Path, force: bool) -> Path:
    kcfg = cfg.kaggle
    sets, files = {}, {}
    collect(cfg, source, sets, files)
    stamp = [(rel, src.stat().st_size, src.stat().st_mtime_ns) for rel, src in files.items() if isinstance(src, Path)]
    key = config_hash([kcfg, source, cfg.submit.stat,
                       {n: s["stage_key"] for n, s in sets.items()}, stamp, _code_hash()])
    if not force and is_up_to_date(out / MANIFEST, key, [out / "inference.ipynb"]):
        log(f"[kaggle] up to date: {out}")
        log(report(out))
        return out
    started = time.time()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for rel, src in files.items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, dict):
                write_json(dst, src)
            elif dst.suffix == ".pt":
                copy_checkpoint(src, dst, kcfg.fp16)
            else:
                shutil.copy2(src, dst)
        wheels = build_wheels(tmp / "wheels")
        manifest = make_manifest(cfg, source, sets, tmp, key, wheels)
        write_json(tmp / MANIFEST, manifest)
        write_metadata(cfg, source, tmp, wheels)
        if kcfg.verify:
            verify(cfg, tmp, manifest)
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[kaggle] built {out} in {time.time() - started:.1f}s")
    log(report(out))
    return out


CHECKOUT = Path(__file__).resolve().parents[2]  # pipeline/stages/kaggle.py -> the checkout


def code_files() -> list[Path]:
    """The package's sources, every sub-package's, and its pyproject.toml: what its wheel is built from."""
    return [p for p in sorted((CHECKOUT / "pipeline").rglob("*.py")) + [CHECKOUT / "pyproject.toml"] if p.exists()]


def _code_hash() -> str:
    """The package's sources (its wheel is rebuilt when they change)."""
    h = hashlib.sha256()
    for p in code_files():
        h.update(str(p.relative_to(CHECKOUT)).encode() + p.read_bytes())
    return h.hexdigest()[:12]


# -------------------------------------------------------------------------- what the bundle needs
def collect(cfg: Config, name: str, sets: dict, files: dict) -> None:
    """``sets[name]`` (after those it is made from: dependency order) and the files it needs
    (``files[bundle path] = source path``, or a dict written as JSON)."""
    if name in sets:
        return
    d = features_dir(cfg, name)
    meta = require_complete(d, ["test.parquet"], f"test predictions of '{name}'",
                            f"make them first (`make features`, `make stack` or `make postprocess` for '{name}')")
    saved = yaml_load((d / "config.yaml").read_text())  # the resolved config the set was made with
    if saved["competition"]["name"] != cfg.competition.name:
        raise InputError(f"{d}: made for competition '{saved['competition']['name']}', not "
                         f"'{cfg.competition.name}' of this config; bundle it with its own config.")
    stage, spec = meta.get("stage"), {"stage_key": meta["stage_key"]}
    if stage not in SET_KINDS:
        raise InputError(f"{d}: made by stage '{stage}', which a bundle cannot redo ({', '.join(SET_KINDS)}).")
    SET_KINDS[stage](cfg, name, d, meta, saved, spec, sets, files)
    files[f"configs/{name}.yaml"] = d / "config.yaml"
    sets[name] = spec



# A feature set of each kind (the stage that made it) and what the bundle carries to redo it; the notebook's
# side of each kind is pipeline.kaggle.inference.SET_KINDS.
def _level1_set(cfg: Config, name: str, d: Path, meta: dict, saved: dict, spec: dict, sets: dict, files: dict) -> None:
    fcfg = saved["features"]
    if fcfg["embedding"] and fcfg["pca"]:
        raise InputError(f"{d}: made with features.pca, a PCA fitted per fold on train images that a bundle does "
                         "not carry; bundle an experiment made without features.pca.")
    spec.update(kind="features", models=[], features={k: fcfg[k] for k in (
        "tta", "scales", "stats", "keep_views", "embedding", "batch_size")})
    for k in meta.get("test_models", meta["models"]):  # the models behind test.parquet
        ckpt = fold_dir(cfg, k, name) / "best.pt"
        if not ckpt.exists():
            raise InputError(f"{ckpt}: checkpoint of fold {k} of '{name}' is missing, but {d} was made with it; "
                             "restore it, or retrain (`make train`) and remake the features.")
        files[f"models/{name}/fold{k}.pt"] = ckpt
        spec["models"].append(f"models/{name}/fold{k}.pt")


def _stack_set(cfg: Config, name: str, d: Path, meta: dict, saved: dict, spec: dict, sets: dict, files: dict) -> None:
    l2 = d / "models"
    if not (l2 / SAVED).exists():
        raise InputError(f"{l2}: no saved level-2 models ({d} was made before `stack` saved them); rerun it with "
                         f"`make stack FORCE=1` and its config.")
    lspec = read_json(l2 / SAVED)
    if not lspec["reproducible"]:
        raise InputError(f"{d}: level-2 model '{lspec['model']}' cannot be reloaded in a notebook; a bundle "
                         f"carries stack.model {' or '.join(SAVED_MODELS)}.")
    for e in lspec["experiments"]:
        collect(cfg, e, sets, files)
    for f in [SAVED, *lspec["files"].values()]:
        files[f"level2/{name}/{f}"] = l2 / f
    spec.update(kind="stack", experiments=lspec["experiments"], level2=f"level2/{name}",
                tabular=[c for c in saved["competition"]["tabular"] if c in lspec["columns"]])


def _postprocess_set(cfg: Config, name: str, d: Path, meta: dict, saved: dict, spec: dict, sets: dict,
                     files: dict) -> None:
    pcfg = saved["postprocess"]
    params = {"source": meta["source"], "blend_with": pcfg["blend_with"], "force_from": pcfg["force_from"],
              "params": read_json(d / "postprocess.json")["params"]}
    for e in (params["source"], params["blend_with"], (params["force_from"] or {}).get("experiment")):
        if e:
            collect(cfg, e, sets, files)
    files[f"postprocess/{name}.json"] = params
    spec.update(kind="postprocess", params=f"postprocess/{name}.json")


def _knn_set(cfg: Config, name: str, d: Path, meta: dict, saved: dict, spec: dict, sets: dict, files: dict) -> None:
    """The fold models (to embed the test rows) and each one's neighbour index."""
    exp = saved["name"]
    spec.update(kind="knn", models=[], indexes=[], params=f"knn/{name}.json")
    for k in meta["test_models"]:
        ckpt, index = fold_dir(cfg, k, exp) / "best.pt", d / "index" / f"fold{k}.npz"
        for f in (ckpt, index):
            if not f.exists():
                raise InputError(f"{f}: missing, but {d} was made with it; remake it (`make train`, `make knn`).")
        files[f"models/{exp}/fold{k}.pt"], files[f"knn/{name}/fold{k}.npz"] = ckpt, index
        spec["models"].append(f"models/{exp}/fold{k}.pt")
        spec["indexes"].append(f"knn/{name}/fold{k}.npz")
    files[f"knn/{name}.json"] = read_json(d / "knn.json")


SET_KINDS = {"features": _level1_set, "stack": _stack_set, "postprocess": _postprocess_set, "knn": _knn_set}

def copy_checkpoint(src: Path, dst: Path, fp16: bool) -> None:
    """The checkpoint's slim copy (weights, heads, model and image settings), floats in half precision with
    ``fp16``; no optimizer or EMA state."""
    from pipeline.training.checkpoint import Checkpoint

    Checkpoint.read(src).write(dst, slim=True, fp16=fp16)


def make_manifest(cfg: Config, source: str, sets: dict, folder: Path, key: str, wheels: list[str]) -> dict:
    comp = cfg.competition
    sample = table_path(cfg, "sample_submission")
    if not sample.exists():
        raise InputError(f"{sample}: not found; the bundle records the sample submission's columns (check "
                         "competition.root).")
    tabular = [c for s in sets.values() for c in s.get("tabular", [])]
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name not in (MANIFEST, *METADATA)}
    return {"format": FORMAT, "source": source, "stage_key": key, "git": git_info(), "fp16": cfg.kaggle.fp16,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "competition": {**comp, "root": None},
            "class_labels": class_labels(cfg), "sample_columns": list(pd.read_csv(sample, nrows=0).columns),
            "test_columns": list(dict.fromkeys([comp.id, *tabular])), "submit": {"stat": cfg.submit.stat},
            "sets": sets, "wheels": wheels, "files": files,
            "versions": versions.recorded()}  # what it was built and verified with (the notebook prints them)


# ------------------------------------------------------------------------ Kaggle-facing files
def slugs(cfg: Config, source: str) -> tuple[str, str, str]:
    """(user, dataset slug, competition slug) as Kaggle spells them."""
    kcfg = cfg.kaggle
    user = kcfg.user or os.environ.get("KAGGLE_USERNAME") or "your-kaggle-username"
    slug = kcfg.dataset or re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", f"{cfg.competition.name}-{source}"
                                                       .lower())).strip("-")[:50].strip("-")
    if kcfg.dataset is None and len(slug) < 6:
        slug = f"{slug}-bundle"
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{4,48}[a-z0-9]", slug):
        raise ConfigError(f"kaggle.dataset = {slug!r}: a Kaggle dataset slug is 6-50 characters of a-z, 0-9 and '-'.")
    return user, slug, kcfg.competition or cfg.competition.name


def write_metadata(cfg: Config, source: str, folder: Path, wheels: list[str]) -> None:
    user, slug, competition = slugs(cfg, source)
    title = f"{source} bundle"[:50]
    write_json(folder / "dataset-metadata.json", {"title": title if len(title) >= 6 else f"{title} (pipeline)",
                                                  "id": f"{user}/{slug}", "licenses": [{"name": "CC0-1.0"}]})
    write_json(folder / "kernel-metadata.json", {
        "id": f"{user}/{slug}-inference", "title": f"{slug}-inference", "code_file": "inference.ipynb",
        "language": "python", "kernel_type": "notebook", "is_private": True, "enable_gpu": True,
        **({"machine_shape": cfg.kaggle.machine_shape} if cfg.kaggle.machine_shape else {}),
        "enable_internet": False, "dataset_sources": [f"{user}/{slug}"], "competition_sources": [competition],
        "kernel_sources": []})
    sample = cfg.competition.sample_submission
    (folder / "inference.ipynb").write_text(json.dumps(notebook(slug, competition, sample, wheels, source),
                                                       indent=1) + "\n")


NOTEBOOK_SETUP = '''\
import importlib, itertools, os, subprocess, sys
from pathlib import Path

# Kaggle mounts the attached dataset and competition read-only under /kaggle/input; outputs go to
# /kaggle/working (KAGGLE_INPUT_DIR / KAGGLE_WORKING_DIR run this notebook elsewhere).
INPUT = Path(os.environ.get("KAGGLE_INPUT_DIR", "/kaggle/input"))
WORKING = Path(os.environ.get("KAGGLE_WORKING_DIR", "/kaggle/working"))


def find(slug, marker):
    """The attached folder `slug` holding `marker`: /kaggle/input/<slug>, or one or two levels below."""
    for folder in itertools.chain([INPUT / slug], INPUT.glob(f"*/{slug}"), INPUT.glob(f"*/*/{slug}")):
        if (folder / marker).is_file():
            return folder
    raise FileNotFoundError(f"no {slug}/{marker} under {INPUT}: add '{slug}' to this notebook's inputs")


BUNDLE = find(%(bundle)s, "bundle.json")
COMPETITION = find(%(competition)s, %(sample)s)
print("bundle:", BUNDLE, "| competition:", COMPETITION)
'''
NOTEBOOK_INSTALL = '''\
# No internet: install the bundle's wheels and nothing else; the Kaggle image has torch, timm, lightgbm, ...
# (--no-deps: pip does not re-resolve the image's own packages, whose pins may disagree with each other)
pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links",
                      str(BUNDLE / "wheels"), %(wheels)s], capture_output=True, text=True)
print(pip.stdout[-2000:], pip.stderr[-2000:])
pip.check_returncode()
importlib.invalidate_caches()
'''
NOTEBOOK_PREDICT = '''\
import pandas as pd
from pipeline.kaggle.inference import predict_bundle

# every fold model with its TTA, level 2, post-processing, then the checks `make submit` makes.
# TIME_BUDGET (seconds; None = no limit): fewer fold models, then TTA views, when the projection exceeds it
TIME_BUDGET = float(os.environ["TIME_BUDGET"]) if os.environ.get("TIME_BUDGET") else None
submission = predict_bundle(BUNDLE, COMPETITION, WORKING / "submission.csv", time_budget=TIME_BUDGET)
pd.read_csv(submission).head()
'''


def notebook(bundle: str, competition: str, sample: str, wheels: list[str], source: str) -> dict:
    pins = ["==".join(w.split("-")[:2]) for w in wheels]  # pipeline-0.1.0-py3-none-any.whl -> pipeline==0.1.0
    values = {"bundle": json.dumps(bundle), "competition": json.dumps(competition), "sample": json.dumps(sample),
              "wheels": ", ".join(map(json.dumps, pins))}
    text = [f"# {source}: inference from the `{bundle}` bundle\n\nBuilt by `make kaggle`. Add the dataset "
            f"`{bundle}` and the competition `{competition}` as inputs, turn the internet off, and run all cells: "
            "the notebook installs the pipeline from the bundle's wheels and writes `/kaggle/working/submission.csv`.",
            NOTEBOOK_SETUP % values, NOTEBOOK_INSTALL % values, NOTEBOOK_PREDICT]
    cells = []
    for i, src in enumerate(text):
        cell = {"cell_type": "markdown" if i == 0 else "code", "id": f"cell-{i}", "metadata": {},
                "source": src.splitlines(keepends=True)}
        if i:
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                                        "name": "python3"},
                                         "language_info": {"name": "python"}}, "nbformat": 4, "nbformat_minor": 5}


# --------------------------------------------------------------------------------- checks, report
def verify(cfg: Config, folder: Path, manifest: dict) -> None:
    """Predict the local test set from the bundle alone: every feature set must match its test.parquet
    (with fp16 weights, only level 1 is compared, to 2e-2)."""
    id_col, fp16 = cfg.competition.id, manifest["fp16"]
    _, frames = predict(folder, cfg.competition.root, device=cfg.train.device)
    tol, worst, compared = (2e-2 if fp16 else 1e-4), 0.0, []
    for name, frame in frames.items():
        if fp16 and manifest["sets"][name]["kind"] != "features":
            continue
        compared.append(name)
        path = features_dir(cfg, name) / "test.parquet"
        made = pd.read_parquet(path).set_index(id_col).reindex(frame[id_col])
        cols = [c for c in frame.columns if c != id_col]
        lacking = [c for c in cols if c not in made.columns]
        if lacking:
            raise InputError(f"{path}: lacks columns the bundle predicts ({lacking[:3]}); remake it.")
        diff = float(np.nanmax(np.abs(frame[cols].to_numpy(float) - made[cols].to_numpy(float))))
        if not diff <= tol:
            raise InputError(f"{path}: the bundle predicts the local test set differently (max |diff| {diff:.3g} > "
                             f"{tol:g}); its models changed since these predictions were made: remake them "
                             "(`make features`/`stack`/`postprocess`) or set kaggle.verify=false.")
        worst = max(worst, diff)
    log(f"[kaggle] verified: from its own files, the bundle reproduces the local test predictions of "
        f"{', '.join(compared)} (max |diff| {worst:.1e}" + (", fp16 weights: level 1 only)" if fp16 else ")"))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def report(out: Path) -> str:
    rows = sorted((p.relative_to(out).as_posix(), p.stat().st_size) for p in out.rglob("*") if p.is_file())
    lines = [f"[kaggle] {out}: {len(rows)} files, {_size(sum(n for _, n in rows))}"]
    lines += [f"    {_size(n):>10s}  {rel}" for rel, n in rows]
    lines.append(f"[kaggle] upload: kaggle datasets create -p {out} --dir-mode zip   (update: kaggle datasets version "
                 f"-p {out} --dir-mode zip -m '...'); notebook: kaggle kernels push -p {out}")
    return "\n".join(lines)
