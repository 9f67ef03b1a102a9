"""``make tune``: hyperparameter search on an Optuna study; every trial is an ordinary experiment.

    make tune CONFIG=configs/demo-tune.yaml TRIALS=20
    python -m pipeline tune -c configs/demo-tune.yaml tune.storage=postgresql://me@db-host/optuna  # each machine

The config's ``tune:`` section (``pipeline.config.tune``) declares the search space over dotted config
keys, the number of trials (in total, over every worker of the study), the fold(s) a trial trains on
and the pruner. The space is checked before any training: each key must exist and each bound or
choice must be a value the key accepts.

A trial is the experiment ``<study>-trial<k>``: its resolved config is saved in
``tune/<study>/trials/``, the train stage trains it (through ``run_stage``: this module imports no
stage), and the leaderboard gets its train row plus a ``tune`` row with the trial number, its state
and parameters. Every validation score is reported to Optuna (one step per validation), so the
median or Hyperband pruner stops a bad trial early.

Several workers (the same command on several machines, or twice on one) share the study through its
storage: the default SQLite file ``tune/<study>/study.db`` (one machine) or ``tune.storage``
(PostgreSQL or MySQL, any number of machines). A worker claims each trial under a lock shared by all
workers (a file lock beside the SQLite file, else an advisory lock on the server), so the study gets
exactly ``tune.trials`` trials and none runs twice. A running trial sends a heartbeat; one whose worker
was killed is marked failed by the next worker (it does not count, another trial takes its place).

At the end: ``configs/<name>-best.yaml`` (the config with the best trial's values, which
``make train`` runs as it is), and ``tune/<study>/history.png``, ``importance.png``, ``trials.csv``.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from pipeline.metrics import get_metric
from pipeline.stages import run_stage
from pipeline.store import leaderboard, plots
from pipeline.store.io import dump_yaml, log, write_csv, write_resolved_config, write_text
from pipeline.store.leaderboard_db import describe
from pipeline.store.paths import tune_dir

if TYPE_CHECKING:
    from pipeline.config.schema import Config

_FIXED = ("name", "workdir", "train.folds", "train.full")  # what a trial is, not how its model trains


def _get(cfg: Config, key: str):
    node = cfg.model_dump()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _probes(spec: dict) -> list:
    return list(spec["choices"]) if spec["type"] == "categorical" else [spec["low"], spec["high"]]


def check_space(cfg: Config) -> dict:
    """The search space, refused (naming the key) when a key does not exist, cannot be searched, or a
    bound or choice is not a value the key accepts; runs before any trial trains."""
    from pipeline.config.loading import FREE_FORM, known_keys
    from pipeline.config.loading import _suggest as did_you_mean

    space, tcfg = cfg.tune.params, cfg.tune
    if not space:
        raise ConfigError("tune.params is empty: declare the search space, e.g. tune.params.train.lr="
                          "'{low: 1.0e-4, high: 1.0e-2, log: true}' (see pipeline/config/tune.py).")
    known = set(known_keys())
    for key, spec in space.items():
        if key.split(".")[0] in ("tune", "leaderboard") or key in _FIXED:
            raise ConfigError(f"tune.params.{key}: '{key}' cannot be searched (it says what a trial is or where it "
                              "goes, not how its model trains); search train.*, model.*, data.* keys instead.")
        if key not in known and not any(key.startswith(f + ".") for f in FREE_FORM):
            raise ConfigError(f"tune.params.{key}: unknown config key '{key}'.{did_you_mean(key)}")
        default = _get(cfg, key)
        if spec["type"] == "float" and isinstance(default, int) and not isinstance(default, bool):
            raise ConfigError(f"tune.params.{key}: '{key}' takes integers; give it integer bounds (or type: int).")
        for value in _probes(spec):
            cfg.updated({key: value}, where=f"tune.params.{key} (value {value!r})")
    for i, values in enumerate(tcfg.enqueue):
        extra = sorted(set(values) - set(space))
        if extra:
            raise ConfigError(f"tune.enqueue[{i}] sets {', '.join(extra)}, which tune.params does not search; "
                              f"searched keys: {', '.join(space)}.")
        cfg.updated(values, where=f"tune.enqueue[{i}]")
    return space


def trial_config(cfg: Config, params: dict, name: str) -> Config:
    """The experiment one trial trains: the config with the trial's values, on tune.folds."""

    folds = cfg.tune.folds
    fixed = {"name": name, "train.folds": None if folds == "all" else folds, "train.full": False}
    return cfg.updated({**params, **fixed}, where=f"tune trial {name}")


def _inside(spec: dict, value) -> bool:
    if spec["type"] == "categorical":
        return value in spec["choices"]
    return isinstance(value, (int, float)) and not isinstance(value, bool) and spec["low"] <= value <= spec["high"]


def _suggest(trial, key: str, spec: dict):
    if spec["type"] == "categorical":
        return trial.suggest_categorical(key, spec["choices"])
    if spec["type"] == "int":
        return trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=int(spec["step"] or 1), log=spec["log"])
    return trial.suggest_float(key, float(spec["low"]), float(spec["high"]), step=spec["step"], log=spec["log"])


def _storage_error(url: str, exc: Exception) -> ConfigError:
    reason = (str(getattr(exc, "orig", None) or exc).strip() or type(exc).__name__).splitlines()[0]
    return ConfigError(f"tune.storage {describe(url)}: cannot open the study storage ({reason}); start the server, "
                       "fix the URL or install its driver (psycopg[binary] for PostgreSQL is in requirements.txt).")


class _Claim:
    """One lock shared by every worker of a study: held while a worker sets the study up and while it
    counts the trials and creates the next one, so no more than ``tune.trials`` are ever created."""

    def __init__(self, url: str, study: str):
        self.url, self.study, self._held = url, study, None

    def acquire(self) -> None:
        if self._held is not None:
            return
        if self.url.startswith("sqlite"):
            import fcntl

            path = Path(self.url.split(":///", 1)[1] + ".lock")
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a")
            fcntl.flock(f, fcntl.LOCK_EX)
            self._held = lambda: (fcntl.flock(f, fcntl.LOCK_UN), f.close())
            return
        try:
            import sqlalchemy

            conn = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool,
                                            isolation_level="AUTOCOMMIT").connect()
        except Exception as exc:  # no SQLAlchemy or driver, a bad URL, a server that does not answer
            raise _storage_error(self.url, exc) from None
        key = int(hashlib.sha1(f"pipeline-tune:{self.study}".encode()).hexdigest()[:15], 16)
        lock, unlock = {"postgresql": ("SELECT pg_advisory_lock(%s)", "SELECT pg_advisory_unlock(%s)"),
                        "mysql": ("SELECT GET_LOCK(%s, 3600)", "SELECT RELEASE_LOCK(%s)")}.get(conn.dialect.name, (None, None))
        arg = key if conn.dialect.name == "postgresql" else f"pipeline-tune:{self.study}"[:64]
        if lock:
            conn.exec_driver_sql(lock, (arg,))
        else:
            log(f"[tune] no cross-worker lock for {conn.dialect.name}: run one worker per study there")

        def release():
            try:
                if unlock:
                    conn.exec_driver_sql(unlock, (arg,))
            finally:
                conn.close()  # a dropped session releases its lock on the server too
        self._held = release

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class _Reporter:
    """The epoch hook of a trial: reports each validation score as one step (0, 1, ... over the trial's
    folds and epochs, so `tune.warmup_steps: N` spares its first N validations); prunes when told to."""

    def __init__(self, trial):
        self.trial, self.step, self.last = trial, -1, None

    def __call__(self, fold, epoch: int, score) -> None:
        import optuna

        self.step += 1
        self.last = f"fold {fold} epoch {epoch}: {score:.4f}" if score is not None else f"fold {fold} epoch {epoch}"
        if score is None or not math.isfinite(score):
            return
        self.trial.report(float(score), self.step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after {self.step + 1} validation(s) ({self.last})")


def _open(cfg: Config, url: str, study_name: str):
    import optuna

    tcfg = cfg.tune
    metric = get_metric(cfg.competition.metric)
    grace = tcfg.grace or 2 * tcfg.heartbeat
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat_interval is marked experimental
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=tcfg.heartbeat,
                                                 grace_period=grace)
    except Exception as exc:  # a missing driver, a refused connection, a bad URL: all the user's to fix
        raise _storage_error(url, exc) from None
    sampler = (optuna.samplers.RandomSampler(seed=tcfg.seed) if tcfg.sampler == "random"
               else optuna.samplers.TPESampler(seed=tcfg.seed))
    pruner = {"median": lambda: optuna.pruners.MedianPruner(tcfg.startup_trials, tcfg.warmup_steps),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1),
              "none": optuna.pruners.NopPruner}[tcfg.pruner]()
    direction = "maximize" if metric.higher_is_better else "minimize"
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner,
                                direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError(f"tune.study '{study_name}' in {describe(url)} was created to {study.direction.name.lower()}, "
                          f"but {metric.name} is to {direction}; set tune.study to a new name.")
    return study


def run(cfg: Config, force: bool = False) -> dict:
    import optuna
    from optuna.trial import TrialState

    space = check_space(cfg)
    tcfg = cfg.tune
    study_name = tcfg.study or cfg.name
    out = tune_dir(cfg, study_name)
    url = tcfg.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    out.mkdir(parents=True, exist_ok=True)
    claim = _Claim(url, study_name)
    with claim:  # one worker at a time creates the tables and the study, and enqueues the first trials
        study = _open(cfg, url, study_name)
        first = {k: _get(cfg, k) for k in space if _inside(space[k], _get(cfg, k))} if tcfg.baseline else {}
        if tcfg.baseline and len(first) < len(space):
            log(f"[tune] baseline trial: the config's {', '.join(sorted(set(space) - set(first)))} lie outside the "
                "space and are sampled")
        for values in ([first] if first else []) + list(tcfg.enqueue):
            study.enqueue_trial(values, skip_if_exists=True)
    log(f"[tune] study '{study_name}' in {describe(url)}: {tcfg.trials} trials on fold(s) {tcfg.folds}, "
        f"{tcfg.pruner} pruner, searching {', '.join(space)}")

    def objective(trial):
        claim.release()  # the trial exists: other workers may claim the next one
        params = {k: _suggest(trial, k, spec) for k, spec in space.items()}
        name = f"{study_name}-trial{trial.number:03d}"
        tcfg_ = trial_config(cfg, params, name)
        write_resolved_config(out / "trials" / f"{name}.yaml", tcfg_)
        reporter, started, state, value, folds = _Reporter(trial), time.time(), "failed", None, None
        try:
            summary = run_stage("train", tcfg_, force=force, on_epoch=[reporter])
            value, folds, state = summary.get("oof_score", summary["cv_mean"]), summary["folds"], "complete"
            return value
        except optuna.TrialPruned:
            state = f"pruned after {reporter.step + 1} validation(s) ({reporter.last})"
            raise
        finally:
            leaderboard.record(tcfg_, "tune", started, cv=value, folds=folds, experiment=name, trial=trial.number,
                               note=f"study {study_name} trial {trial.number}: {state}; " + json.dumps(params))

    counted = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)  # enqueued (WAITING) ones run first
    while True:
        claim.acquire()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # marked experimental
                optuna.storages.fail_stale_trials(study)  # trials of killed workers: failed, not counted
            if len(study.get_trials(deepcopy=False, states=counted)) >= tcfg.trials:
                break
            study.optimize(objective, n_trials=1)
        finally:
            claim.release()
    with claim:  # read afresh under the lock: the worker that finishes last writes the final results
        return finish(cfg, study, out)


def finish(cfg: Config, study, out: Path) -> dict:
    """The study's trials table and plots, and the best config (a full config ``make train`` runs)."""
    from optuna.trial import TrialState


    metric = get_metric(cfg.competition.metric)
    write_csv(out / "trials.csv", study.trials_dataframe())
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        log(f"[tune] no trial of study '{study.study_name}' has completed yet: no best config written")
        return {"study": study.study_name, "best": None}
    plots.optuna_figures(study, metric.name, out)
    best = study.best_trial
    name = f"{cfg.name}-best"
    best_cfg = cfg.updated({**best.params, "name": name}, where=f"tune best trial {best.number}")
    path = Path(cfg.tune.output.format(name=cfg.name, study=study.study_name))
    states = [t.state for t in study.get_trials(deepcopy=False)]
    write_text(path, f"# best of tune study '{study.study_name}': trial {best.number}, {metric.name} {best.value:.5f} "
                     f"on fold(s) {cfg.tune.folds}\n# {json.dumps(best.params)}\n" + dump_yaml(best_cfg))
    log(f"[tune] {len(states)} trials ({states.count(TrialState.COMPLETE)} complete, "
        f"{states.count(TrialState.PRUNED)} pruned, {states.count(TrialState.FAIL)} failed); best: trial "
        f"{best.number}, {metric.name} {best.value:.4f}, {best.params}; wrote {path} and {out}/")
    return {"study": study.study_name, "best": best.value, "trial": best.number, "params": best.params,
            "config": str(path), "trials": len(states)}
