"""Predict a competition's test set from a bundle (``make kaggle``) and write a validated submission.

    from pipeline.kaggle.inference import predict_bundle
    predict_bundle("/kaggle/input/demo-demo-stack-pp", "/kaggle/input/demo", "/kaggle/working/submission.csv")

A bundle holds what the chain learned, listed in its ``bundle.json``: every fold model of each level-1
experiment with its TTA settings, the level-2 models ``stack`` saved, the parameters ``postprocess``
tuned, and the submit settings. Test features are made as ``features`` makes them (same views,
statistics, mean over the fold models), then level 2, the rules, and the checks ``submit`` makes.
Only ``test.csv``, ``sample_submission.csv`` and the test images are read from the competition folder
(which may be read-only, like ``/kaggle/input``); nothing is written but ``output``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.competition.submission import submits_integers, text_columns, to_submission, validate
from pipeline.competition.tables import image_paths, load_test, read_table, table_path
from pipeline.errors import InputError
from pipeline.level2.models import SAVED, predict_saved
from pipeline.level2.rules import apply_rules
from pipeline.store.io import atomic_path, log, read_json
from pipeline.store.paths import head_prediction, main_head, prediction_frame

if TYPE_CHECKING:
    from pipeline.config.schema import Config

MANIFEST = "bundle.json"
FORMAT = 1


def read_manifest(bundle: str | Path) -> dict:
    """``bundle.json``, once every file it lists is there with the size it had when built."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not path.exists():
        raise InputError(f"{bundle}: not a bundle (no {MANIFEST}); attach the dataset `make kaggle` built and "
                         "point at its folder.")
    manifest = read_json(path)
    if manifest.get("format") != FORMAT:
        raise InputError(f"{path}: bundle format {manifest.get('format')!r}, this pipeline reads {FORMAT}; install "
                         "the pipeline wheel that came with the bundle (its wheels/ folder).")
    files = manifest["files"]
    missing = [f for f in files if not (bundle / f).is_file()]
    if missing:
        raise InputError(f"{bundle}: {missing[0]} is missing ({len(missing)} of the {len(files)} files {MANIFEST} "
                         f"lists: {', '.join(missing[:5])}); rebuild the bundle with `make kaggle` and upload it again.")
    for f, size in files.items():
        if (bundle / f).stat().st_size != size:
            raise InputError(f"{bundle / f}: {(bundle / f).stat().st_size} bytes, but {MANIFEST} says {size} (a "
                             "truncated or replaced file); rebuild the bundle with `make kaggle` and upload it again.")
    return manifest


def competition_config(manifest: dict, competition: str | Path) -> Config:
    """The config the loaders read: the bundle's competition, rooted at ``competition`` (validated like
    any config; the other sections keep their defaults, which prediction does not read)."""
    from pipeline.config.schema import validate

    return validate({"name": manifest["source"], "workdir": ".",
                     "competition": {**manifest["competition"], "root": str(competition)}}, where="bundle manifest")


def _header(path: Path) -> list[str]:
    return list(pd.read_csv(path, nrows=0).columns)


def check_competition(manifest: dict, cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """test.csv and sample_submission.csv, refusing a folder of another competition (other columns) and
    test rows without an image."""
    comp = cfg.competition
    root = Path(comp.root)
    name = manifest["competition"]["name"]
    for which in ("test", "sample_submission"):
        path = table_path(cfg, which)
        if not path.is_file():
            raise InputError(f"{path}: not found; is {root} the folder of competition '{name}' (the bundle "
                             f"reads {comp.test}, {comp.sample_submission} and {comp.image} there)?")
    sample_path, test_path = table_path(cfg, "sample_submission"), table_path(cfg, "test")
    if _header(sample_path) != manifest["sample_columns"]:
        raise InputError(f"{sample_path}: columns {_header(sample_path)} differ from {manifest['sample_columns']} of "
                         f"competition '{name}' the bundle was built for: the bundle is from another competition, or "
                         "another competition is attached.")
    need = manifest["test_columns"]
    lacking = [c for c in need if c not in _header(test_path)]
    if lacking:
        raise InputError(f"{test_path}: column(s) {lacking} that the bundle's models read are missing (columns: "
                         f"{_header(test_path)}; competition '{name}' has {need}): the bundle is from another "
                         "competition, or another competition is attached.")
    test = load_test(cfg, check_images=True)  # names the ids without an image file
    return test, read_table(sample_path, "sample_submission", comp.id)


def _views_that_fit(model, loader, views, device, budget: float, n_models: int, name: str) -> list:
    """The TTA views one model can run within its share of ``budget`` (timed on the first batch), at least
    the first (plain) view; fold models are dropped first, views only when one model alone would not fit."""
    from pipeline.predict.tta import predict_views

    it = iter(loader)
    first = next(it, None)
    if first is None:
        return views
    t0 = time.time()
    predict_views(model, model.head_specs, [first], views, device)
    projected = (time.time() - t0) * len(loader)  # one model, every view
    keep = max(1, int(len(views) * budget / max(projected, 1e-9)))
    if keep < len(views):
        log(f"[inference] {name}: time budget {budget:.0f}s: one model with {len(views)} TTA views is projected at "
            f"{projected:.0f}s; using the first {keep} view(s) (and as many of the {n_models} fold models as fit)")
    return views[:keep]


def level1_frame(bundle: Path, name: str, spec: dict, cfg: Config, test: pd.DataFrame, device,
                 budget: float | None = None) -> pd.DataFrame:
    """An experiment's test features as ``features`` makes them: per fold model, every TTA view's outputs
    aggregated (mean/var/max/min), then the mean over fold models; keyed by id, in test.csv order. With a
    ``budget`` (seconds), fewer fold models (then fewer TTA views) when the projected time exceeds it."""
    from tqdm.auto import tqdm

    from pipeline.competition.images import SharedImages, loader_workers
    from pipeline.predict.model_run import ModelRun
    from pipeline.predict.tta import aggregate, tta_views
    from pipeline.training.fold_models import require_one_config

    f, id_col = spec["features"], cfg.competition.id
    views = tta_views(f["tta"], f.get("scales"))
    paths = image_paths(cfg, test[id_col], "test")
    workers = loader_workers({"num_workers": "auto"}, device)  # decode in workers on a GPU machine
    parts, images, keys = [], SharedImages(paths, {"cache": "auto"}, workers, f"{name}: decode test images"), {}
    models, started = list(spec["models"]), time.time()
    for i, rel in enumerate(tqdm(models, desc=f"{name}: fold models", leave=False)):
        if budget is not None and i and (time.time() - started) / i * (i + 1) > budget:
            log(f"[inference] {name}: time budget {budget:.0f}s: {i} of {len(models)} fold models fit (about "
                f"{(time.time() - started) / i:.0f}s each); the test mean uses those {i}")
            break
        run = ModelRun(bundle / rel, device)  # the image size/normalisation the model was trained with
        keys[rel] = run.stage_key
        require_one_config(keys)  # never a mean over models of different configs
        loader = run.loader(images, f["batch_size"], workers)
        if budget is not None and i == 0 and len(views) > 1 and not f["keep_views"]:
            views = _views_that_fit(run.model, loader, views, device, budget, len(models), name)
        outputs = run.predict(loader, views, embed=f["embedding"], desc=f"{name}: {rel}")
        parts.append(aggregate(name, outputs, f["stats"], f["keep_views"]))
    cols = list(parts[0].columns)
    mean = np.mean([p[cols].to_numpy() for p in parts], axis=0)
    return pd.concat([pd.DataFrame({id_col: test[id_col].to_numpy()}), pd.DataFrame(mean, columns=cols)], axis=1)


def predict(bundle: str | Path, competition: str | Path, device: str = "auto",
            time_budget: float | None = None) -> tuple[pd.DataFrame, dict]:
    """The validated submission frame and every feature set's test predictions ({name: frame keyed by id}).
    ``time_budget`` (seconds, e.g. a Kaggle notebook's limit less a margin) is shared by the level-1 sets."""
    from pipeline.kaggle import versions
    from pipeline.training.models import pick_device

    t_start = time.time()
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    log("[inference] " + versions.report(manifest.get("versions")))
    versions.check({"albumentations"} | ({"lightgbm"} if any(s["kind"] == "stack" for s in manifest["sets"].values())
                                         else set()))
    cfg = competition_config(manifest, competition)
    test, sample = check_competition(manifest, cfg)
    comp, device = cfg.competition, pick_device(device)
    id_col, head = comp.id, main_head(cfg)
    ids = test[id_col].to_numpy()
    frames: dict[str, pd.DataFrame] = {}
    for name, spec in manifest["sets"].items():  # in dependency order
        started = time.time()
        budget = None
        if spec["kind"] == "features" and time_budget is not None:
            # an equal share of what is left for each level-1 set still to run
            left = [n for n, s in manifest["sets"].items() if s["kind"] == "features" and n not in frames]
            budget = max(0.0, time_budget - (time.time() - t_start)) / len(left)
        frames[name], what = SET_KINDS[spec["kind"]](SetInputs(bundle, name, spec, cfg, test, device, frames, budget))
        log(f"[inference] {name}: {what}, {len(ids)} test rows, {time.time() - started:.1f}s ({device})")
    source = manifest["source"]
    pred = head_prediction(frames[source], source, head, manifest["submit"]["stat"])
    sub = to_submission(cfg, pred, test[id_col].astype(str), sample, manifest.get("class_labels"))
    validate(sub, sample, id_col, where=f"submission of bundle '{source}'", integers=submits_integers(cfg, sample),
             text=text_columns(cfg))
    return sub, frames


def predict_bundle(bundle: str | Path, competition: str | Path, output: str | Path = "/kaggle/working/submission.csv",
                   device: str = "auto", time_budget: float | None = None) -> Path:
    """Predict ``competition``'s test set with the bundle and write the validated submission to ``output``
    (within ``time_budget`` seconds when given: fewer fold models, then TTA views, as the log says)."""
    started = time.time()
    sub, _ = predict(bundle, competition, device, time_budget)
    output = Path(output)
    with atomic_path(output) as tmp:
        sub.to_csv(tmp, index=False)
    log(f"[inference] wrote {output} ({len(sub)} rows, validated against the competition's sample submission) "
        f"in {time.time() - started:.1f}s")
    return output


@dataclass
class SetInputs:
    """What the notebook has when it redoes one feature set of a bundle: the sets before it in ``frames``."""
    bundle: Path
    name: str
    spec: dict
    cfg: Config
    test: pd.DataFrame
    device: object
    frames: dict
    budget: float | None = None


def _level1_set(s: SetInputs) -> tuple[pd.DataFrame, str]:
    frame = level1_frame(s.bundle, s.name, s.spec, s.cfg, s.test, s.device, s.budget)
    return frame, f"{len(s.spec['models'])} fold model(s), TTA {s.spec['features']['tta']}"


def _stack_set(s: SetInputs) -> tuple[pd.DataFrame, str]:
    id_col, head = s.cfg.competition.id, main_head(s.cfg)
    folder, exps = s.bundle / s.spec["level2"], s.spec["experiments"]
    l2 = read_json(folder / SAVED)
    T = pd.concat([s.frames[e].drop(columns=[id_col]) for e in exps]
                  + [s.test[s.spec["tabular"]].reset_index(drop=True)], axis=1)
    preds = [head_prediction(s.frames[e], e, head, l2["stat"]) for e in exps]
    pred = predict_saved(folder, T, preds)
    frame = prediction_frame(s.test[id_col].to_numpy(), id_col, s.name, head, pred)
    return frame, f"level 2 ({l2['model']}, {l2['test_mode']}) on {', '.join(exps)}"


def _postprocess_set(s: SetInputs) -> tuple[pd.DataFrame, str]:
    id_col, head, task = s.cfg.competition.id, main_head(s.cfg), s.cfg.competition.task
    pp = read_json(s.bundle / s.spec["params"])
    src, other, force = pp["source"], pp["blend_with"], pp["force_from"]
    p = head_prediction(s.frames[src], src, head)
    o = head_prediction(s.frames[other], other, head) if other else None
    onehot = (head_prediction(s.frames[force["experiment"]], force["experiment"], force.get("head", head))
              if force else None)
    pred = apply_rules(pp["params"], task, p, o, onehot)
    return prediction_frame(s.test[id_col].to_numpy(), id_col, s.name, head, pred), f"rules {sorted(pp['params'])} on {src}"


def _knn_set(s: SetInputs) -> tuple[pd.DataFrame, str]:
    """Each fold model embeds the test rows and searches its own saved index; the mean over the models."""
    from pipeline.competition.images import SharedImages, loader_workers
    from pipeline.predict import neighbours
    from pipeline.predict.model_run import ModelRun

    id_col, info = s.cfg.competition.id, read_json(s.bundle / s.spec["params"])
    workers = loader_workers({"num_workers": "auto"}, s.device)
    images = SharedImages(image_paths(s.cfg, s.test[id_col], "test"), {"cache": "auto"}, workers,
                          f"{s.name}: decode test images")
    preds = []
    for rel, index in zip(s.spec["models"], s.spec["indexes"]):
        emb = ModelRun(s.bundle / rel, s.device).predict(images, batch_size=info["batch_size"], workers=workers,
                                                         embed=True)["embedding"]
        preds.append(neighbours.predict(neighbours.Index.load(s.bundle / index), emb, info["k"], info["scale"],
                                        info["n_classes"], info["new_class"], info["test_threshold"]))
    frame = prediction_frame(s.test[id_col].to_numpy(), id_col, s.name, main_head(s.cfg), np.mean(preds, axis=0))
    return frame, f"kNN (k={info['k']}) over {len(preds)} fold index(es)"


# each kind of set a bundle holds -> how the notebook redoes it (the bundle's side: pipeline.stages.kaggle.SET_KINDS)
SET_KINDS = {"features": _level1_set, "stack": _stack_set, "postprocess": _postprocess_set, "knn": _knn_set}
