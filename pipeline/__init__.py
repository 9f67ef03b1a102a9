"""An image-competition pipeline: folds -> pretrain -> train -> features -> stack -> postprocess -> submit.

From a notebook or script::

    from pipeline import load_config, run_stage
    cfg = load_config("configs/demo.yaml", ["train.epochs=3"])
    run_stage("train", cfg)

or on the command line: ``python -m pipeline <stage> -c configs/<experiment>.yaml [key=value ...]``.
"""
__version__ = "0.1.0"


def load_config(path=None, overrides=()):
    """Defaults <- YAML file (with its ``base`` chain) <- ``key=value`` overrides, validated."""
    from pipeline.config.loading import load_config as _load

    return _load(path, overrides)


def run_stage(stage: str, cfg, force: bool = False):
    """Run one stage in-process on a ``load_config`` result (a plain dict is validated first; see ``pipeline.stages``)."""
    from pipeline.stages import run_stage as _run

    return _run(stage, cfg, force=force)


def predict_bundle(bundle, competition, output="/kaggle/working/submission.csv", device="auto"):
    """Predict a competition's test set from a ``make kaggle`` bundle and write the validated submission
    (see ``pipeline.kaggle.inference``): ``predict_bundle("/kaggle/input/<bundle>", "/kaggle/input/<competition>")``."""
    from pipeline.kaggle.inference import predict_bundle as _predict

    return _predict(bundle, competition, output, device)
