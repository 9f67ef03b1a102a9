"""``make postprocess``: rules tuned on out-of-fold predictions only, then applied to test.

Rules (each a config switch, applied in this order):

- ``blend_with``: blend the source with a level-1 experiment, ``w·source + (1-w)·other`` (w tuned, or fixed)
- ``force_from``: force class i when a one-hot (multiclass) head's probability exceeds t (t tuned)
- ``class_scale``: per-class probability multipliers (multiclass)
- ``threshold``: the decision threshold of a binary target (for F1, accuracy, ...); a label set's threshold per
  label
- ``rounding``: optimised rounding thresholds of an ordinal/regression target (QWK)
- ``clip``: clip regression values to the train target's range (or a given [lo, hi])

The gain is reported twice: in-sample (tuned and scored on all OOF rows) and nested (for each fold,
tuned on the other folds and scored on it), so an overfit threshold is visible. The OOF written is the
nested one and its score is the CV (``cv.json``, leaderboard): no row's value was tuned with its own label,
so level 2 or a blend may train on it. The test predictions get the rules tuned on every OOF row.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipeline.competition.tables import competition_key, fold_of, load_folds, load_train, truth
from pipeline.errors import InputError

# the rules live in pipeline.level2.rules (shared with the notebook inference); re-exported here
from pipeline.level2.rules import (  # noqa: F401
    GRID,
    RANK_METRICS,
    apply_blend,
    apply_clip,
    apply_force,
    apply_rounding,
    apply_rules,
    apply_scale,
    apply_threshold,
    fit_rules,
    honest_gain,
)
from pipeline.metrics import get_metric, lifted_estimate
from pipeline.store import leaderboard
from pipeline.store.artifacts import ArtifactGroup, inherited_leak, require_complete, stage_lock
from pipeline.store.io import (
    config_hash,
    is_up_to_date,
    log,
    provenance,
    read_json,
    read_parquet_meta,
    resolved_config_text,
)
from pipeline.store.paths import features_dir, head_prediction, main_head, prediction_frame, stack_name
from pipeline.tasks import task_of

if TYPE_CHECKING:
    from pipeline.config.schema import Config


# ------------------------------------------------------------------------------------------- stage
def run(cfg: Config, force: bool = False) -> Path:
    with stage_lock(features_dir(cfg, cfg.postprocess.name or "postprocess")):
        return _run(cfg, force)


# (over 60 lines on purpose: the stage's story in order, inputs -> key -> up-to-date check -> work -> one
# commit; the work itself is in the helpers above and below)
def _run(cfg: Config, force: bool) -> Path:
    pcfg, comp = cfg.postprocess, cfg.competition
    task = comp.task
    metric = get_metric(comp.metric)
    id_col, head = comp.id, main_head(cfg)
    source = pcfg.source or (stack_name(cfg) if (features_dir(cfg, stack_name(cfg)) / "oof.parquet").exists()
                                else cfg.name)
    name = pcfg.name or f"{source}-pp"
    src_dir, out = features_dir(cfg, source), features_dir(cfg, name)
    if not (src_dir / "oof.parquet").exists():
        raise InputError(f"{src_dir}: no OOF predictions to post-process; run `make features` or `make stack` first.")
    train_df = load_train(cfg, check_images=False)
    folds_df, folds_hash = load_folds(cfg)
    inputs = [source] + [e for e in (pcfg.blend_with, (pcfg.force_from or {}).get("experiment")) if e]
    for e in inputs:
        require_complete(features_dir(cfg, e), ["oof.parquet", "test.parquet"], f"predictions of '{e}'",
                         "run `make features` or `make stack` for it first")
    metas = {e: read_parquet_meta(features_dir(cfg, e) / "oof.parquet") for e in inputs}
    for e, m in metas.items():
        if m.get("folds_hash") != folds_hash:
            raise InputError(f"features/{e} was made with another folds file; post-processing must be tuned on "
                             "OOF of the current folds. Rebuild it.")
    # "nested OOF": outputs of earlier versions (in-sample OOF handed on) are not up to date
    key = config_hash([pcfg, competition_key(comp), folds_hash, [m.get("stage_key") for m in metas.values()], "nested OOF"])
    if not force and is_up_to_date(out / "meta.json", key, [out / "oof.parquet", out / "test.parquet"]):
        log(f"[postprocess] up to date: {out}")
        return out
    started = time.time()

    def load(exp, which, head_name=head, stat="mean"):
        df = pd.read_parquet(features_dir(cfg, exp) / f"{which}.parquet")
        order = train_df[[id_col]] if which == "oof" else None
        if order is not None:
            df = order.merge(df, on=id_col, how="left")
        return df[id_col].to_numpy(), head_prediction(df, exp, head_name, stat)

    _, p = load(source, "oof")
    test_ids, pt = load(source, "test")
    other = other_t = onehot = onehot_t = None
    if pcfg.blend_with:
        other, other_t = load(pcfg.blend_with, "oof")[1], load(pcfg.blend_with, "test")[1]
    if pcfg.force_from and task_of(cfg).label_sets:
        raise InputError("postprocess.force_from forces one class where a head is sure of it; a label set "
                         f"(competition.task={comp.task}) has no single class: remove force_from.")
    if pcfg.force_from:
        ff = pcfg.force_from
        onehot = load(ff["experiment"], "oof", ff.get("head", head))[1]
        onehot_t = load(ff["experiment"], "test", ff.get("head", head))[1]
        if onehot.ndim != 2:
            raise InputError(f"postprocess.force_from: head '{ff.get('head', head)}' of {ff['experiment']} is not a "
                             "multiclass (one-hot) head.")
    y = truth(cfg, train_df)
    fold = fold_of(cfg, train_df, folds_df)
    # the OOF written is the nested one (fold k by rules tuned on the other folds), so level 2, a blend or
    # another round of post-processing can train on it; the test gets the rules tuned on every row
    res, oof_pp = honest_gain(pcfg, task, metric, y, p, fold, other, onehot)
    test_pp = apply_rules(res["params"], task, pt, other_t, onehot_t)

    cv = {"overall": {"tta": res["nested"], "no_tta": res["nested"]},
          **{k: {"tta": v, "no_tta": v} for k, v in res["per_fold_nested"].items()}}
    src_cv = read_json(src_dir / "cv.json") if (src_dir / "cv.json").exists() else {}
    submission = lifted_estimate(res["nested"], {source: src_cv.get("submission")}, {source: res["base"]},
                                 "post-processed")
    leak = inherited_leak(metas)
    meta = provenance(cfg, "postprocess", key, folds_hash=folds_hash, source=source, gain=res, cv=cv, leak=leak)
    with ArtifactGroup(out / "meta.json") as group:
        group.parquet(out / "oof.parquet", prediction_frame(train_df[id_col].to_numpy(), id_col, name, head, oof_pp,
                                                            fold), meta)
        group.parquet(out / "test.parquet", prediction_frame(test_ids, id_col, name, head, test_pp), meta)
        group.json(out / "cv.json", {**cv, "submission": submission})
        group.json(out / "postprocess.json", res)
        group.text(out / "config.yaml", resolved_config_text(cfg))
        group.commit(meta)
    leaderboard.record(cfg, "stack", started, cv=res["nested"], folds=res["per_fold_nested"], experiment=name,
                       note="postprocess (nested CV score)" + (f"; {leak}" if leak else ""),
                       predicted=submission["predicted"], predicted_how=submission["how"],
                       artifacts=[str(out / "oof.parquet"), str(out / "test.parquet")])
    for line in _warnings(cfg, res, source, metric):
        log(line)
    log(f"[postprocess] {name}: {metric.name} {res['base']:.4f} -> in-sample {res['in_sample']:.4f} "
        f"({res['in_sample_gain']:+.4f}), nested CV {res['nested']:.4f} ({res['nested_gain']:+.4f}); "
        f"params {res['params']}"
        + (f"; predicted submission {submission['predicted']:.4f} ({submission['how']})"
           if submission["predicted"] is not None else ""))
    return out


SWITCHES = {"class_scale": "class_scale", "threshold": ("threshold", "label_thresholds"), "rounding": "rounding",
            "clip": "clip"}  # postprocess.<switch> -> the task rule(s) it tunes


def _warnings(cfg: Config, res: dict, source: str, metric) -> list[str]:
    """What the user should know before submitting the post-processed set: switches the task has no rule
    for (ignored), thresholds under a ranking metric (no effect), and rules that lose on nested CV."""
    task, pcfg, lines = task_of(cfg), cfg.postprocess, []
    for switch, rules in SWITCHES.items():
        if pcfg[switch] and not set([rules] if isinstance(rules, str) else rules) & set(task.rules):
            lines.append(f"[postprocess] warning: postprocess.{switch} does not apply to task {task.name} (its "
                         f"rules: {', '.join(task.rules)}); ignored")
    if pcfg.threshold and "label_thresholds" in task.rules and metric.name in RANK_METRICS:
        lines.append(f"[postprocess] note: {metric.name} scores each label's ranking, which no threshold changes; "
                     "the thresholds stay 0.5")
    if (metric.higher_is_better and res["nested_gain"] < 0) or (not metric.higher_is_better and res["nested_gain"] > 0):
        lines.append(f"[postprocess] WARNING: the rules lose on nested CV ({res['nested']:.4f} against {res['base']:.4f} "
                     f"for {source} alone): they fit the OOF rows' noise. Submit {source} (submit.source={source}), "
                     "or switch the losing rule off.")
    return lines
