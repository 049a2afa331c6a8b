"""Full-int8 TFLite with MSE-optimal activation ranges.

The TFLite converter quantizes every activation tensor over the [min, max] it saw
on the representative images. One rare large value then coarsens the step for
all values of that tensor; over the ~90 tensors of a ResNet-56 the rounding noise
accumulates (measured: logit RMS error 0.26, top-1 agreement with float 96-98% on
pruned ResNet-56s). Here each tensor's range is instead the fraction of its
[min, max] that minimises the int8 round-trip error of its sampled values (the
"MSE" range estimator of TensorRT/NNCF), which clips the rare outliers.

Route: the converter's calibration-only mode (the same private hook that
`tf.lite.experimental.QuantizationDebugger` uses) gives the float model with the
observed [min, max] of every activation; the float model is run with LiteRT to
sample each tensor's values; the chosen ranges are written back and the model is
quantized by the converter's own MLIR quantizer.
"""
from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import tensorflow as tf

# Candidate ranges: these fractions of the observed [min, max].
RANGE_FRACTIONS = np.linspace(0.3, 1.0, 15)


def quantization_mse(values: np.ndarray, low: float, high: float) -> float:
    """Mean squared error of asymmetric int8 quantization of `values` over [low, high]."""
    scale = (high - low) / 255.0
    if scale <= 0:
        return float("inf")
    zero_point = np.round(-128.0 - low / scale)
    q = np.clip(np.round(values / scale) + zero_point, -128, 127)
    return float(np.mean(((q - zero_point) * scale - values) ** 2))


def mse_range(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """The fraction of [low, high] (which holds 0) with the least int8 round-trip error."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    errors = [quantization_mse(values, f * low, f * high) for f in RANGE_FRACTIONS]
    best = RANGE_FRACTIONS[int(np.argmin(errors))]
    return best * low, best * high


def _private_api():
    try:
        from tensorflow.lite.python import convert as tfl_convert
        from tensorflow.lite.tools import flatbuffer_utils
    except ImportError as e:  # pragma: no cover - depends on the TF build
        raise RuntimeError("int8 calibration 'mse' needs TFLite's converter internals "
                           f"({e}); use export.int8_calibration=minmax") from None
    return tfl_convert, flatbuffer_utils


def _calibrated_tensors(model) -> list[int]:
    """Indices of the activation tensors that carry one calibrated [min, max]."""
    out = []
    for i, t in enumerate(model.subgraphs[0].tensors):
        q = t.quantization
        if q is not None and q.min is not None and q.max is not None and len(q.min) == 1:
            out.append(i)
    return out


def sample_activations(calibrated: bytes, tensors: list[int], images: np.ndarray,
                       batch_size: int = 32, max_values: int = 100_000, seed: int = 0) -> dict:
    """{tensor index: (min, max, sampled values)} of the float model on `images`.

    The exact min/max are kept; at most `max_values` values per tensor are kept
    (a uniform sample per batch), so memory stays bounded at ImageNet sizes.
    """
    from ai_edge_litert.interpreter import Interpreter
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "calibrated.tflite")
        with open(path, "wb") as f:
            f.write(calibrated)
        with warnings.catch_warnings():  # "intended for debugging": reading them is the point
            warnings.simplefilter("ignore")
            interpreter = Interpreter(model_path=path, experimental_preserve_all_tensors=True)
    inp = interpreter.get_input_details()[0]
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    per_batch = max(1, max_values // len(batches))
    stats = {i: [np.inf, -np.inf, []] for i in tensors}
    shape = None
    for batch in batches:
        if batch.shape != shape:
            interpreter.resize_tensor_input(inp["index"], list(batch.shape))
            interpreter.allocate_tensors()
            shape = batch.shape
        interpreter.set_tensor(inp["index"], np.asarray(batch, np.float32))
        interpreter.invoke()
        for i in tensors:
            v = interpreter.get_tensor(i).ravel()
            s = stats[i]
            s[0], s[1] = min(s[0], float(v.min())), max(s[1], float(v.max()))
            s[2].append(v if v.size <= per_batch else rng.choice(v, per_batch, replace=False))
    return {i: (lo, hi, np.concatenate(vals)) for i, (lo, hi, vals) in stats.items()}


def convert_int8_mse(converter, images: np.ndarray, int8_io: bool = False) -> bytes:
    """Full-int8 flatbuffer from a converter already set up for int8 (representative data set)."""
    tfl_convert, flatbuffer_utils = _private_api()
    converter._experimental_calibrate_only = True  # pylint: disable=protected-access
    calibrated = converter.convert()
    model = flatbuffer_utils.convert_bytearray_to_object(calibrated)
    tensors = _calibrated_tensors(model)
    if not tensors:
        raise RuntimeError("the calibrated TFLite model carries no activation ranges; "
                           "use export.int8_calibration=minmax")
    stats = sample_activations(calibrated, tensors, images)
    for i in tensors:
        low, high, values = stats[i]
        low, high = mse_range(values, low, high)
        q = model.subgraphs[0].tensors[i].quantization
        q.min = np.array([low], np.float32)
        q.max = np.array([high], np.float32)
    io_type = tf.int8 if int8_io else tf.float32
    return bytes(tfl_convert.mlir_quantize(
        bytes(flatbuffer_utils.convert_object_to_bytearray(model)),
        input_data_type=io_type, output_data_type=io_type))
