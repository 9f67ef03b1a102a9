import numpy as np
import pytest

from pipeline.metrics import METRICS, get_metric


def test_values_on_known_inputs():
    y = np.array([0, 1, 2, 1])
    p = np.eye(3)[[0, 1, 1, 1]]
    assert METRICS["accuracy"](y, p) == 0.75
    assert METRICS["rmse"]([0, 0], [3, 4]) == pytest.approx(np.sqrt(12.5))
    assert METRICS["mae"]([0, 0], [3, 4]) == 3.5
    assert METRICS["qwk"]([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0
    assert METRICS["auc"]([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert METRICS["logloss"]([1, 0], [0.5, 0.5]) == pytest.approx(np.log(2))
    assert METRICS["macro_f1"](y, p) == pytest.approx(np.mean([1, 0.8, 0]))


def test_direction():
    assert get_metric("rmse").better(0.1, 0.2) and not get_metric("rmse").better(0.3, 0.2)
    assert get_metric("accuracy").better(0.9, 0.8)
    assert get_metric("logloss").better(0.5, None)
    with pytest.raises(ValueError, match="unknown metric"):
        get_metric("f2")
