"""The ``kaggle:`` section of the typed config: what ``make kaggle`` bundles and how (``pipeline.stages.kaggle``)."""
from __future__ import annotations

from pipeline.config.types import Section


class Kaggle(Section):
    source: str | None = None  # feature set to bundle; default: what submit submits (pp, level 2, level 1)
    output: str = "kaggle/{name}"  # relative to workdir; {name} = the source
    fp16: bool = False  # checkpoints' floating-point weights in half precision (half the size)
    user: str | None = None  # Kaggle user owning the dataset; default: $KAGGLE_USERNAME
    dataset: str | None = None  # dataset slug (6-50 of a-z, 0-9, -); default: <competition>-<source>
    competition: str | None = None  # the competition's slug on Kaggle (/kaggle/input/<it>); default: its name
    # the notebook's accelerator (kernel-metadata.json machine_shape); PyPI's CUDA builds of torch no longer
    # run on the P100, so the default asks for a T4
    machine_shape: str | None = "NvidiaTeslaT4"
    verify: bool = True  # predict the local test set from the bundle; refuse it unless it matches the features
