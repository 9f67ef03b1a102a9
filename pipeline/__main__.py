"""Command line: ``python -m pipeline <stage> -c configs/x.yaml [key=value ...]``."""
from __future__ import annotations

import argparse
import importlib
import sys

from .competition import InputError
from .config import ConfigError, load_config

# stage name -> module holding its ``run(cfg, force=...)`` entry point (or module:function)
STAGES = {
    "data": "demo",
    "folds": "folds",
    "pretrain": "pretrain",
    "train": "train",
    "lr-find": "train:lr_find",
    "features": "features",
    "stack": "stack",
    "postprocess": "postprocess",
    "submit": "submit",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lb"]:
        return _leaderboard(argv[1:])
    if argv[:1] == ["config"]:
        return _show_config(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    parser.add_argument("stage", choices=sorted(STAGES), help="stage to run")
    parser.add_argument("-c", "--config", help="experiment YAML under configs/")
    parser.add_argument("--force", action="store_true", help="rerun even when the outputs are up to date")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=3 folds.n_splits=4")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        module_name, _, func = STAGES[args.stage].partition(":")
        module = importlib.import_module(f"pipeline.{module_name}")
        getattr(module, func or "run")(cfg, force=args.force)
    except (InputError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _show_config(argv: list[str]) -> int:
    """``config -c x.yaml [key=value ...] [--get dotted.key]``: print the resolved config (or one value)."""
    from .config import config_hash, dump_yaml

    parser = argparse.ArgumentParser(prog="python -m pipeline config")
    parser.add_argument("-c", "--config")
    parser.add_argument("--get", help="print only this dotted key's value")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.get:
        value = cfg
        for part in args.get.split("."):
            if not isinstance(value, dict) or part not in value:
                print(f"error: no config key '{args.get}'", file=sys.stderr)
                return 2
            value = value[part]
        print(value if not isinstance(value, (dict, list)) else dump_yaml(value).strip())
    else:
        print(f"# hash {config_hash(cfg)}\n" + dump_yaml(cfg))
    return 0


def _leaderboard(argv: list[str]) -> int:
    """``lb`` has its own sub-commands; ``-c`` and key=value overrides still choose the database."""
    from . import leaderboard

    cfg_path, overrides, rest = None, [], []
    it = iter(argv)
    for a in it:
        if a in ("-c", "--config"):
            cfg_path = next(it, None)
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
        else:
            rest.append(a)
    try:
        cfg = load_config(cfg_path, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return leaderboard.main(rest, cfg)


if __name__ == "__main__":
    sys.exit(main())
