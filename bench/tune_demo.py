"""Does tuning pay on the demo? 20 one-fold `tune` trials (configs/demo-tune.yaml), then the full 5-fold
CV of the best config next to the default's (configs/demo.yaml). Prints both; writes under bench/out/.

    .venv/bin/python bench/tune_demo.py [--trials 20] [--workers 1]

Heavy on CPU (about 20 one-fold trainings, pruned ones shorter, plus two 5-fold CVs).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "tune_demo"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1, help="tune worker processes sharing the SQLite study")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    from pipeline import load_config, run_stage

    common = [f"workdir={OUT}", f"competition.root={OUT}/data"]  # its own copy of the demo data
    default = load_config(REPO / "configs/demo.yaml", common)
    if not (OUT / "data/train.csv").exists():
        run_stage("data", default)
    run_stage("folds", default)

    best_path = OUT / "demo-tune-best.yaml"
    t0 = time.time()
    cmd = [sys.executable, "-m", "pipeline", "tune", "-c", "configs/demo-tune.yaml", *common,
           f"tune.trials={args.trials}", f"tune.output={best_path}"]
    procs = [subprocess.Popen(cmd) for _ in range(args.workers)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a tune worker failed")
    t_tune = time.time() - t0
    import optuna

    study = optuna.load_study(study_name="demo-tune", storage=f"sqlite:///{OUT}/tune/demo-tune/study.db")
    states = [t.state.name for t in study.trials]

    results = {}
    for label, cfg in (("default (configs/demo.yaml)", default), ("tuned (best trial)", load_config(best_path))):
        t0 = time.time()
        s = run_stage("train", cfg)
        results[label] = (s.get("oof_score", s["cv_mean"]), s["cv_mean"], s["cv_std"], time.time() - t0)

    print(f"\n== tune on the demo: {len(states)} one-fold trials ({states.count('COMPLETE')} complete, "
          f"{states.count('PRUNED')} pruned, {states.count('FAIL')} failed) in {t_tune / 60:.1f} min, "
          f"{args.workers} worker(s)")
    print(f"best trial {study.best_trial.number}: fold-0 accuracy {study.best_value:.4f}, {study.best_params}")
    base = next((t for t in study.trials if t.number == 0), None)
    if base is not None and base.value is not None:
        print(f"trial 0 (the default's values): fold-0 accuracy {base.value:.4f}")
    print(f"{'5-fold CV':32s} {'OOF accuracy':>12s} {'fold mean ± std':>18s} {'train min':>10s}")
    for label, (oof, mean, std, sec) in results.items():
        print(f"{label:32s} {oof:12.4f} {mean:10.4f} ± {std:.4f} {sec / 60:10.1f}")


if __name__ == "__main__":
    main()
