"""An experiment's fold models as ``train`` leaves them: ``models/<exp>/fold<k>/`` (and ``foldfull``, the
all-data model), each a ``best.pt`` checkpoint and a ``meta.json`` that vouches for it. ``FoldModels`` is the
one reader of that folder: which folds are there, their meta, whether each is current for a train key
(``training.train_key``), and which models predict the test rows. Every stage and reader asks it, so one
staleness rule holds everywhere: features and the Predictor refuse fold models that ``train --check`` would
retrain, or that were trained by different configs, instead of averaging them.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import InputError, UnsafeCheckpoint
from pipeline.store.io import read_json, read_parquet_meta
from pipeline.training.checkpoint import Checkpoint

FULL = "full"  # the all-data model's fold name (folder foldfull)


class FoldModels:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._metas: dict = {}

    def dir(self, k) -> Path:
        return self.folder / f"fold{k}"

    def checkpoint(self, k) -> Path:
        return self.dir(k) / "best.pt"

    def has(self, k) -> bool:
        return (self.dir(k) / "meta.json").exists() and self.checkpoint(k).exists()

    def meta(self, k) -> dict:
        if k not in self._metas:
            path = self.dir(k) / "meta.json"
            self._metas[k] = read_json(path) if path.exists() else {}
        return self._metas[k]

    def stage_keys(self) -> dict[str, str | None]:
        """{fold folder name: stage key} of every fold with a meta.json (a teacher's key, for its student)."""
        return {p.parent.name: read_json(p).get("stage_key") for p in sorted(self.folder.glob("fold*/meta.json"))}

    def is_current(self, k, key: str) -> bool:
        """A fold is up to date when its meta.json AND every artifact it vouches for carry this train key
        (best.pt, best_valid.parquet): files of one config are never taken for another's."""
        best, valid = self.checkpoint(k), self.dir(k) / "best_valid.parquet"
        try:
            if not self.has(k) or read_json(self.dir(k) / "meta.json").get("stage_key") != key:
                return False
            if Checkpoint.read(best, mmap=True).stage_key != key:
                return False
            return not valid.exists() or read_parquet_meta(valid).get("stage_key") == key
        except UnsafeCheckpoint:
            raise  # a planted file is named, never taken for a stale one and trained over
        except (OSError, ValueError, RuntimeError):  # (InputError too: not a checkpoint)
            return False

    def require_current(self, folds, key: str) -> None:
        """Refuse fold models that this config would retrain (another backbone, lr, folds file, train.csv,
        images or teacher), naming the first such fold."""
        for k in folds:
            if not self.is_current(k, key):
                raise InputError(f"{self.dir(k)}: the fold model is out of date for this config (it was trained "
                                 "with another config, folds file, train.csv, images or teacher); run `make train` "
                                 "(same config and overrides) first; features never mix models of different configs")

    def require_folds(self, n_splits: int, folds_hash: str) -> dict:
        """Every fold's meta (OOF features need all of them), each trained on this folds file."""
        for k in range(n_splits):
            if not self.has(k):
                raise InputError(f"{self.dir(k)}: no trained model for fold {k}; run `make train` for every fold "
                                 "(OOF features need all of them).")
            if self.meta(k)["folds_hash"] != folds_hash:
                raise InputError(f"{self.dir(k)} was trained with folds file hash {self.meta(k)['folds_hash']}, but "
                                 f"the folds file now has hash {folds_hash}; the OOF rows would leak. Retrain "
                                 "(`make train`) with the current folds, or restore the old folds file.")
        return {k: self.meta(k) for k in range(n_splits)}

    def require_full(self) -> Path:
        """The all-data model's checkpoint, for ``use_full=only`` (it alone predicts the test rows)."""
        full = self.checkpoint(FULL)
        if not full.exists():
            raise InputError(f"{full}: no all-data model, but use_full=only predicts the test rows with it alone. "
                             "Train it (`make train ARGS=\"train.full=true\"`) or copy it, or set "
                             "features.use_full=false.")
        return full

    def refuse_mixed_full(self, folds, strict: bool = True) -> None:
        """The all-data model joins a mean over fold models only when it was trained with their config. A
        model without its meta.json did not finish (train removes it while a fold trains) and is refused;
        ``strict=False`` (the Predictor: a models folder copied to Kaggle may carry no meta.json at all)
        compares only the models whose meta.json came along."""
        keys = {f"fold{k}": self.meta(k).get("stage_key") for k in [*folds, FULL]
                if strict or (self.dir(k) / "meta.json").exists()}
        if len(set(keys.values())) > 1:
            raise InputError(f"{self.folder}/foldfull was trained with another config than the fold models (stage "
                             f"keys {keys}), or did not finish; its test predictions would not match theirs. Retrain "
                             "it with their config (`make train ARGS=\"train.full=true\"`) or leave features.use_full off.")

    def for_test(self, folds: list, use_full: bool | str, strict: bool = True) -> tuple[list, list]:
        """(models to run, models whose mean predicts the test rows): the fold models, plus the all-data model
        with ``use_full`` (if trained), or the all-data model alone with ``use_full=only``."""
        if use_full == "only":
            self.require_full()
        with_full = bool(use_full) and self.checkpoint(FULL).exists()
        if with_full:
            self.refuse_mixed_full(folds, strict)
        models = list(folds) + ([FULL] if with_full else [])
        return models, ([FULL] if use_full == "only" else models)


def require_one_config(keys: dict) -> None:
    """Refuse a set of fold checkpoints that came from different configs (``{fold: stage_key}``), for readers
    that have no train data to recompute the key (the Predictor, a Kaggle bundle)."""
    distinct = sorted({str(v) for v in keys.values()})
    if len(distinct) > 1:
        by = {v: [k for k, kv in keys.items() if str(kv) == v] for v in distinct}
        which = "; ".join(f"{v}: {by[v]}" for v in distinct)
        raise InputError(f"the fold models come from {len(distinct)} different configs ({which}); "
                         "retrain them together (`make train`) instead of averaging models of different configs")
