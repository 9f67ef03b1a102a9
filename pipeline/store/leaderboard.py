"""The experiment leaderboard: CV next to public and private LB, in one SQLite file or a team's server.

Every stage run is recorded (experiment, stage, config + hash, git commit and dirty flag, times,
per-fold and overall CV, per-epoch metrics for training, artifacts, submission file, the Optuna trial
of a ``tune`` run). Leaderboard scores come from local scoring (``solution.csv``), ``lb set`` or an
import of the Kaggle client's submissions CSV. The rows live in ``leaderboard.path`` (SQLite, WAL,
one machine) or ``leaderboard.url`` (PostgreSQL, any number of machines); ``pipeline.store.leaderboard_db`` holds
both backends, and their writers' lock that makes concurrent writers safe.

    python -m pipeline lb [--pattern demo-%] [--markdown LEADERBOARD.md]
    python -m pipeline lb set <experiment|submission.csv> --public 0.91 --private 0.90
    python -m pipeline lb import kaggle_submissions.csv
    python -m pipeline lb plot [--experiment NAME]
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from pipeline.errors import LeaderboardError
from pipeline.store.leaderboard_db import MIGRATIONS, SCHEMA_VERSION, connect, frame, insert_id, is_url  # noqa: F401
from pipeline.store.paths import leaderboard_db, submissions_dir

DEFAULT_DB = "submissions/leaderboard.db"


def db_path(cfg: dict | None) -> Path | str:
    """The leaderboard's location: its SQLite file, or ``leaderboard.url`` when set."""
    return leaderboard_db(cfg)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check(cfg: dict) -> None:
    """Open the leaderboard once before a stage works, so a broken one is named before any output is
    written (not after, when only the record is missing)."""
    where = db_path(cfg)
    if cfg.get("leaderboard", {}).get("enabled", True) and isinstance(where, Path) and where.exists():
        with connect(where):  # (a server is reached when the stage records; nothing is made here)
            pass


def record(cfg: dict, stage: str, started: float, cv: float | None = None, folds: dict | None = None,
           artifacts: list | dict | None = None, submission: str | None = None, epochs: list[dict] | None = None,
           experiment: str | None = None, note: str | None = None, trial: int | None = None,
           predicted: float | None = None, predicted_how: str | None = None,
           repeat_std: float | None = None) -> int | None:
    """Record one stage run (``trial``: its Optuna trial number; ``predicted``: what its fold-mean submission
    should score, found as ``predicted_how`` says; ``repeat_std``: the CV's spread over ``folds.repeats``);
    returns its row id (None when the leaderboard is switched off)."""
    lcfg = cfg.get("leaderboard", {})
    if not lcfg.get("enabled", True):
        return None
    from pipeline.metrics import get_metric
    from pipeline.store.io import config_hash, git_info, redact

    metric = get_metric(cfg.competition.metric)
    vals = [v for v in (folds or {}).values() if v is not None and not (isinstance(v, float) and math.isnan(v))]
    cv_std = float(_std(vals)) if len(vals) > 1 else None
    git = git_info()
    ended = time.time()
    with connect(db_path(cfg), write=True) as con:
        run_id = insert_id(
            con, "INSERT INTO runs (experiment, stage, config_hash, config, git_commit, git_dirty, started, ended,"
            " duration, metric, higher_is_better, cv, cv_std, folds, artifacts, submission, note, trial, predicted,"
            " predicted_how, repeat_std) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (experiment or cfg.name, stage, config_hash(cfg), json.dumps(redact(cfg), default=str), git["commit"],
             None if git["dirty"] is None else int(git["dirty"]),
             datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
             datetime.fromtimestamp(ended, timezone.utc).isoformat(timespec="seconds"), round(ended - started, 3),
             metric.name, int(metric.higher_is_better), cv, cv_std, json.dumps(folds or {}),
             json.dumps(artifacts or [], default=str), submission, note, trial,
             None if predicted is None else float(predicted), predicted_how,
             None if repeat_std is None else float(repeat_std)))
        if epochs:
            con.executemany("INSERT INTO epochs VALUES (?,?,?,?,?,?)",
                            [(run_id, str(e.get("fold")), int(e["epoch"]), e.get("train_loss"), e.get("valid_loss"),
                              e.get("score")) for e in epochs])
    if lcfg.get("mlflow"):
        _mlflow(cfg, stage, cv, folds, experiment or cfg.name)
    return run_id


def _std(vals):
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def _mlflow(cfg, stage, cv, folds, experiment):
    try:
        import mlflow
    except ImportError:
        print("[lb] leaderboard.mlflow is on but the mlflow package is not installed; skipped", flush=True)
        return
    uri = cfg.leaderboard.mlflow_uri or "file:./mlruns"
    if uri.startswith("file:"):  # recent MLflow keeps the file store only on request
        import os

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=stage):
        import pandas as pd

        from pipeline.store.io import config_hash

        flat = pd.json_normalize(cfg, sep=".").iloc[0].to_dict()  # train.lr=..., one param per leaf key
        mlflow.log_params({k: str(v)[:250] for k, v in flat.items()})
        mlflow.set_tag("config_hash", config_hash(cfg))
        if cv is not None:
            mlflow.log_metric("cv", cv)
        for k, v in (folds or {}).items():
            if v is not None:
                mlflow.log_metric(f"cv_{k}", v)


def set_score(path, target: str, public=None, private=None, source: str = "manual", description: str = "") -> str:
    """Attach LB scores to a submission file or an experiment (its latest submission)."""
    for name, v in (("public", public), ("private", private)):
        if v is not None:
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise LeaderboardError(f"--{name} must be a number, got {v!r}.") from None
            if math.isnan(v):
                raise LeaderboardError(f"--{name} must be a number, got NaN.")
    public = None if public is None else float(public)
    private = None if private is None else float(private)
    with connect(path, write=True) as con:
        row = con.execute("SELECT experiment, submission FROM runs WHERE stage='submit' AND (submission=? OR "
                          "submission LIKE ? OR experiment=?) ORDER BY id DESC LIMIT 1",
                          (target, f"%/{Path(target).name}", target)).fetchone()
        if row is None:
            exp = con.execute("SELECT experiment FROM runs WHERE experiment=? LIMIT 1", (target,)).fetchone()
            if exp is None:
                known = [r[0] for r in con.execute("SELECT DISTINCT experiment FROM runs ORDER BY experiment")]
                raise LeaderboardError(f"unknown experiment or submission '{target}'; known experiments: "
                                       f"{', '.join(known) or 'none yet'}.")
            experiment, submission = exp[0], f"(no file) {target}"
        else:
            experiment, submission = row
        old = con.execute("SELECT public, private FROM lb WHERE submission=?", (submission,)).fetchone()
        if old:
            public = public if public is not None else old[0]
            private = private if private is not None else old[1]
        con.execute("DELETE FROM lb WHERE submission=?", (submission,))  # an upsert both backends speak
        con.execute("INSERT INTO lb VALUES (?,?,?,?,?,?,?)",
                    (submission, experiment, public, private, source, description, _now()))
    return experiment


def import_kaggle_csv(path, csv_file) -> list[tuple[str, str]]:
    """Import ``kaggle competitions submissions -c <comp> --csv`` output; match rows by file name, then by
    an experiment name found in the description. Returns (kaggle file, experiment) pairs matched."""
    import pandas as pd

    df = pd.read_csv(csv_file)
    cols = {c.lower(): c for c in df.columns}
    need = ("filename", "publicscore")
    if not all(n in cols for n in need):
        raise LeaderboardError(f"{csv_file}: expected the Kaggle client's columns fileName, date, description, status, "
                               f"publicScore, privateScore; got {', '.join(df.columns)}.")
    with connect(path) as con:
        subs = con.execute("SELECT DISTINCT experiment, submission FROM runs WHERE stage='submit'").fetchall()
    matched = []
    for _, r in df.iterrows():
        fname = str(r[cols["filename"]])
        desc = str(r[cols["description"]]) if "description" in cols else ""
        hit = next(((e, s) for e, s in subs if Path(s).name in (fname, fname + ".gz")), None)
        if hit is None:
            hit = next(((e, s) for e, s in sorted(subs, key=lambda t: -len(t[0])) if e and e in desc), None)
        if hit is None:
            continue
        pub = _num(r.get(cols["publicscore"]))
        priv = _num(r.get(cols.get("privatescore"))) if "privatescore" in cols else None
        if pub is None and priv is None:
            continue
        set_score(path, hit[1], pub, priv, source="kaggle", description=desc)
        matched.append((fname, hit[0]))
    return matched


def _how(text) -> str | None:
    """The kind of a predicted score, for the table: exact, approximate or estimate (the note says more)."""
    return None if not isinstance(text, str) else text.split(":")[0]


def _num(v):
    try:
        f = float(v)
        return None if math.isnan(f) else f
    except (TypeError, ValueError):
        return None


STAGE_PRIORITY = {"stack": 3, "features": 2, "train": 1}


def table(path, pattern: str | None = None):
    """One row per experiment: its best-informed CV (stack > features > train, latest run) and LB scores."""
    import pandas as pd

    with connect(path) as con:
        runs = frame(con, "SELECT * FROM runs WHERE cv IS NOT NULL")
        lb = frame(con, "SELECT * FROM lb ORDER BY updated")
    if pattern:
        regex = pattern.replace("%", ".*").replace("*", ".*")
        try:
            re.compile(regex)
        except re.error as exc:
            raise LeaderboardError(f"--pattern '{pattern}' is not a valid pattern ({exc}); use e.g. 'demo-%'.") from None
        runs = runs[runs["experiment"].str.contains(regex, regex=True)]
    if runs.empty:
        return pd.DataFrame()
    runs["priority"] = runs["stage"].map(STAGE_PRIORITY).fillna(0)
    best = runs.sort_values(["priority", "id"]).groupby("experiment").tail(1)
    rows = []
    for _, r in best.iterrows():
        folds = json.loads(r["folds"] or "{}")
        vals = [v for v in folds.values() if v is not None]
        scores = lb[lb["experiment"] == r["experiment"]]
        last = scores.iloc[-1] if len(scores) else None
        leaky = "LEAKY" in str(r.get("note") or "")  # e.g. distilled from OOF predictions (allow_leak)
        rows.append({"experiment": r["experiment"] + (" (LEAKY)" if leaky else ""), "stage": r["stage"],
                     "metric": r["metric"], "leaky": leaky,
                     "hib": bool(r["higher_is_better"]), "cv": r["cv"],
                     "fold_mean": sum(vals) / len(vals) if vals else None,
                     "fold_std": _std(vals) if len(vals) > 1 else None,
                     "predicted": _num(r.get("predicted")), "how": _how(r.get("predicted_how")),
                     "repeat_std": _num(r.get("repeat_std")),
                     "public": None if last is None else last["public"],
                     "private": None if last is None else last["private"],
                     "lb_source": None if last is None else last["source"],
                     "commit": (r["git_commit"] or "")[:8] + ("*" if r["git_dirty"] else ""), "when": r["ended"]})
    out = pd.DataFrame(rows)
    parts = []
    for _, g in out.groupby("metric", sort=False):
        hib = bool(g["hib"].iloc[0])
        g = g.sort_values("cv", ascending=not hib)
        honest = g[~g["leaky"]]  # a leaky CV is optimistic: Δ is measured from the best honest one
        best_cv = (honest if len(honest) else g)["cv"].iloc[0]
        g["delta"] = g["cv"] - best_cv
        parts.append(g)
    return pd.concat(parts).drop(columns=["hib", "leaky"]).reset_index(drop=True)


def format_table(df, markdown: bool = False) -> str:
    if df.empty:
        return "(no runs with a CV score recorded yet)"

    def f(v, fmt="{:.4f}"):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    headers = ["experiment", "stage", "metric", "CV", "folds mean ± std", "repeats std", "Δ best",
               "predicted sub", "public LB", "private LB", "commit", "when"]
    body = [[r.experiment, r.stage, r.metric, f(r.cv),
             (f(r.fold_mean) + (" ± " + f(r.fold_std) if r.fold_std is not None and not math.isnan(r.fold_std) else "")),
             f(r.repeat_std), f(r.delta, "{:+.4f}"), f(r.predicted) + (f" ({r.how})" if f(r.predicted) else ""),
             f(r.public), f(r.private), r.commit, (r.when or "")[:16]] for r in df.itertuples()]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(map(str, row)) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), fmt.format(*["-" * w for w in widths])] + [fmt.format(*map(str, r)) for r in body])


def plot(path, out_dir: str | Path, experiment: str | None = None) -> list[Path]:
    """CV vs public and CV vs private (correlation, y = x), the four scores per experiment, and an
    experiment's learning curves."""
    from pipeline.store import plots

    out_dir = Path(out_dir)
    written = []
    df = table(path)
    if not df.empty:
        p = out_dir / "lb_cv_vs_lb.png"
        plots.save_figure(p, plots.cv_vs_lb(df))
        written.append(p)
        p = out_dir / "lb_scores.png"  # CV, predicted submission, public and private, per experiment
        plots.save_figure(p, plots.scores_by_experiment(df))
        written.append(p)
    if experiment:
        with connect(path) as con:
            ep = frame(
                con, "SELECT e.* FROM epochs e JOIN runs r ON e.run_id = r.id WHERE r.experiment=? AND r.id = "
                "(SELECT MAX(run_id) FROM epochs e2 JOIN runs r2 ON e2.run_id = r2.id WHERE r2.experiment=?)",
                (experiment, experiment))
        if ep.empty:
            raise LeaderboardError(f"no per-epoch metrics recorded for experiment '{experiment}' (run `make train`).")
        p = out_dir / f"lb_curves_{experiment}.png"
        plots.save_figure(p, plots.curves(ep, "score", experiment))
        written.append(p)
    return written


def main(argv: list[str], cfg: dict | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline lb", description="CV next to public/private LB")
    parser.add_argument("action", nargs="?", default="show", choices=["show", "set", "import", "plot"])
    parser.add_argument("target", nargs="?", help="set: experiment or submission file; import: Kaggle CSV")
    parser.add_argument("--public", help="public LB score")
    parser.add_argument("--private", help="private LB score")
    parser.add_argument("--pattern", help="only experiments whose name matches (regex, %% and * are wildcards)")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    parser.add_argument("--experiment", help="plot: learning curves of this experiment")
    parser.add_argument("--db", help=f"database file or postgresql:// URL (default: leaderboard.url, else "
                                     f"leaderboard.path or {DEFAULT_DB})")
    args = parser.parse_args(argv)
    path = (args.db if is_url(args.db) else Path(args.db)) if args.db else db_path(cfg)
    if args.action == "set":
        if not args.target or (args.public is None and args.private is None):
            raise LeaderboardError("usage: lb set <experiment|submission file> --public X [--private Y]")
        exp = set_score(path, args.target, args.public, args.private)
        print(f"[lb] recorded LB for {exp}: public {args.public}, private {args.private}")
    elif args.action == "import":
        if not args.target or not Path(args.target).exists():
            raise LeaderboardError(f"lb import needs the Kaggle client's CSV file; '{args.target}' not found.")
        matched = import_kaggle_csv(path, args.target)
        print(f"[lb] imported {len(matched)} row(s): " + ", ".join(f"{f} -> {e}" for f, e in matched))
    elif args.action == "plot":
        for p in plot(path, submissions_dir(cfg or {}) if is_url(path) else path.parent, args.experiment):
            print(f"[lb] wrote {p}")
        return 0
    df = table(path, args.pattern)
    print(format_table(df))
    if args.markdown:
        from pipeline.store.io import write_text

        write_text(args.markdown, format_table(df, markdown=True) + "\n")
        print(f"[lb] wrote {args.markdown}")
    return 0
