"""Command line: ``python -m pipeline <stage> -c configs/x.yaml [key=value ...]``.

Also ``config`` (print the resolved config or one key), ``inputs`` (the configs whose features a
stack reads, for Make), ``index`` (a class-folder layout into a train.csv) and ``lb`` (the leaderboard).
A user's mistake prints ``error: ...`` and exits with 2, with no traceback; ``--debug`` shows the
traceback too.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.stages import STAGES, run_stage, stage_up_to_date


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        if argv[:1] == ["lb"]:
            return _leaderboard(argv[1:])
        if argv[:1] == ["config"]:
            return _show_config(argv[1:])
        if argv[:1] == ["inputs"]:
            return _inputs(argv[1:])
        if argv[:1] == ["index"]:
            return _index(argv[1:])
        return _stage(argv)
    except PipelineError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder the user cannot write (read-only workdir, another user's), a full disk
        import errno

        if debug or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        where = exc.filename or "a file"
        print(f"error: cannot write {where}: {exc.strerror}; set workdir=<a folder you can write> (outputs go under "
              "it) or free space / fix that folder's permissions", file=sys.stderr)
        return 2


def project_root(config: str | None) -> Path | None:
    """The folder a config's relative paths mean: the parent of ``configs/`` for a config kept there (the
    repository), else the config's own folder."""
    if not config:
        return None
    folder = Path(config).resolve().parent
    return folder.parent if folder.name == "configs" else folder


def _enter_project(config: str | None) -> str | None:
    """Run from the config's project root, so outputs, the leaderboard and relative paths in the config
    mean the same whatever directory the command is typed in. Returns the config's absolute path."""
    root = project_root(config)
    if root is None:
        return config
    config = str(Path(config).resolve())
    if root != Path.cwd().resolve():
        print(f"[pipeline] working in {root} (the project of {config})", file=sys.stderr)
        os.chdir(root)
    return config


def _stage(argv: list[str]) -> int:
    from pipeline.config.loading import load_config

    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     epilog="other commands: config, inputs, lb; --debug shows tracebacks")
    parser.add_argument("stage", choices=sorted(STAGES), help="stage to run")
    parser.add_argument("-c", "--config", help="experiment YAML under configs/")
    parser.add_argument("--defaults", action="store_true",
                        help="no config file: the built-in defaults and the overrides alone (the project is here)")
    parser.add_argument("--force", action="store_true", help="rerun even when the outputs are up to date")
    parser.add_argument("--check", action="store_true",
                        help="do nothing; exit 0 when the stage's outputs are up to date, 1 when it would run")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=3 folds.n_splits=4")
    args = parser.parse_intermixed_args(argv)
    if not args.config and not args.defaults:
        from pipeline.errors import ConfigError

        raise ConfigError(f"{args.stage}: no config file; pass -c configs/<experiment>.yaml (the built-in defaults "
                          "alone describe no competition of yours and would overwrite the shared folds file; "
                          "--defaults runs them on purpose)")
    config = _enter_project(args.config)
    cfg = load_config(config, args.overrides)
    if args.check:
        current = not args.force and stage_up_to_date(args.stage, cfg)
        print(f"[{args.stage}] {cfg.name}: {'up to date' if current else 'would run'}", file=sys.stderr)
        return 0 if current else 1
    run_stage(args.stage, cfg, force=args.force)
    return 0


def _show_config(argv: list[str]) -> int:
    """``config -c x.yaml [key=value ...] [--get dotted.key]``: print the resolved config (or one value)."""
    from pipeline.config.loading import config_hash, dump_yaml, load_config
    from pipeline.store.io import redact

    parser = argparse.ArgumentParser(prog="python -m pipeline config")
    parser.add_argument("-c", "--config")
    parser.add_argument("--get", help="print only this dotted key's value")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.get:
        value = cfg.model_dump()
        for part in args.get.split("."):
            if not isinstance(value, dict) or part not in value:
                print(f"error: no config key '{args.get}'", file=sys.stderr)
                return 2
            value = value[part]
        print(redact(value) if not isinstance(value, (dict, list)) else dump_yaml(value).strip())
    else:
        print(f"# hash {config_hash(cfg)}\n" + dump_yaml(cfg))
    return 0


def _index(argv: list[str]) -> int:
    """``index <root> [--folder train] [--out train.csv]``: a class-folder layout (``<root>/train/<label>/*.jpg``)
    indexed into ``<root>/train.csv`` (id, label, path); then set competition.path_column=path."""
    from pipeline.competition.layouts import index_class_folders

    parser = argparse.ArgumentParser(prog="python -m pipeline index")
    parser.add_argument("root")
    parser.add_argument("--folder", default="train")
    parser.add_argument("--out", default="train.csv")
    args = parser.parse_args(argv)
    path = index_class_folders(args.root, args.folder, args.out)
    print(f"[index] wrote {path}; use competition.train={args.out} competition.target=label "
          "competition.path_column=path")
    return 0


def _inputs(argv: list[str]) -> int:
    """``inputs [--for stack|train] -c x.yaml [key=value ...]``: one config file per experiment whose
    features x.yaml reads: the level-1 experiments of its stack, or the teachers of its training
    (pseudo-labels, distillation). Make brings their features up to date first."""
    from pipeline.config.loading import config_for_experiment, knn_config, load_config
    from pipeline.errors import ConfigError
    from pipeline.store.paths import stack_inputs

    parser = argparse.ArgumentParser(prog="python -m pipeline inputs")
    parser.add_argument("--for", dest="stage", choices=["stack", "train"], default="stack")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.stage == "train":
        t = cfg.train
        exps = list(dict.fromkeys(e for e in (t.pseudo.source, t.distill.teacher) if e))
        if cfg.name in exps:
            raise ConfigError(f"experiment '{cfg.name}' names itself as its teacher (train.pseudo.source / "
                              "train.distill.teacher); a round's teacher is an earlier experiment.")
    else:  # a kNN set is made by `make knn` with its config: printed as knn=<config>
        for exp in stack_inputs(cfg):
            knn = knn_config(exp, args.config, cfg)
            print(f"knn={knn}" if knn else config_for_experiment(exp, args.config, cfg))
        return 0
    for exp in exps:
        print(config_for_experiment(exp, args.config, cfg))
    return 0


def _leaderboard(argv: list[str]) -> int:
    """``lb`` has its own sub-commands; ``-c`` and key=value overrides still choose the database."""
    from pipeline.config.loading import is_override, load_config
    from pipeline.store import leaderboard

    cfg_path, overrides, rest = None, [], []
    it = iter(argv)
    for a in it:
        if a in ("-c", "--config"):
            cfg_path = next(it, None)
        elif a == "--defaults":  # (as for a stage: no config file, on purpose)
            continue
        elif is_override(a):
            overrides.append(a)
        else:
            rest.append(a)
    return leaderboard.main(rest, load_config(_enter_project(cfg_path), overrides))


if __name__ == "__main__":
    sys.exit(main())
