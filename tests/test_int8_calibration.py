"""MSE-optimal int8 activation ranges (export/int8_calibration.py): the pure parts.

The conversion itself is checked on real networks in test_export.py (ResNet-56
searched to 0.45 MACs: agreement with Keras above the converter's min/max ranges)."""
import numpy as np
import pytest

from ekg_tf.export.int8_calibration import mse_range, quantization_mse
from ekg_tf.export.options import check_calibration


def test_quantization_mse_matches_uniform_rounding_noise():
    values = np.random.default_rng(0).uniform(-1.0, 1.0, 200_000)
    step = 2.0 / 255.0
    # Rounding noise of a step q is uniform on [-q/2, q/2]: variance q^2 / 12.
    assert quantization_mse(values, -1.0, 1.0) == pytest.approx(step ** 2 / 12, rel=0.03)
    assert quantization_mse(values, -0.5, 0.5) > quantization_mse(values, -1.0, 1.0)  # clipping
    assert quantization_mse(values, 0.0, 0.0) == float("inf")


def test_mse_range_clips_long_tails_and_keeps_dense_ranges():
    rng = np.random.default_rng(1)
    # A long tail (like a ReLU activation's): its rare largest values are clipped.
    tail = rng.exponential(1.0, 100_000)
    low, high = mse_range(tail, 0.0, tail.max())
    assert low == 0.0 and high < 0.97 * tail.max()
    assert quantization_mse(tail, low, high) < quantization_mse(tail, 0.0, tail.max())
    # Values that fill their range uniformly keep it whole.
    uniform = rng.uniform(-2.0, 3.0, 100_000)
    assert mse_range(uniform, -2.0, 3.0) == pytest.approx((-2.0, 3.0))
    # The range always holds zero (int8 zero point), even for all-positive values.
    low, high = mse_range(rng.uniform(1.0, 2.0, 1000), 1.0, 2.0)
    assert low == 0.0 and high > 1.0


def test_unknown_calibration_is_refused():
    assert check_calibration("mse") == "mse"
    with pytest.raises(ValueError, match="choose from"):
        check_calibration("percentile")
