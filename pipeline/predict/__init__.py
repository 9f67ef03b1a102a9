"""Prediction from fold models: test-time augmentation views (``tta``) and the ``Predictor`` API for
new images (``predictor``)."""


def __getattr__(name):  # `from pipeline.predict import Predictor`, without importing torch at package import
    if name == "Predictor":
        from pipeline.predict.predictor import Predictor

        return Predictor
    raise AttributeError(name)
