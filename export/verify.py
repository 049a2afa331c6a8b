"""Artifact verification: logit differences, top-1 agreement/accuracy, latency, tolerances.

Reference = the slim Keras model (BN in inference mode). Differences:
`max_abs_diff` = max |logits - reference|, `max_rel_diff` = max_abs_diff / max |reference|.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    max_rel_diff: float | None = None      # float artifacts: logits must match
    min_top1_agreement: float | None = None  # quantized artifacts: predictions must match

    def to_dict(self):
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# Float32 artifacts compute the same function with other kernels (XNNPACK, MLAS,
# Grappler-folded BN): differences are float32 rounding, ~1e-6 relative measured.
FLOAT_TOLERANCE = Tolerance(max_rel_diff=1e-4, min_top1_agreement=0.999)
TOLERANCES = {
    "keras_folded": FLOAT_TOLERANCE,
    "saved_model": FLOAT_TOLERANCE,
    "tflite_float32": FLOAT_TOLERANCE,
    "onnx": FLOAT_TOLERANCE,
    "tflite_float16": Tolerance(max_rel_diff=2e-2, min_top1_agreement=0.99),
    "tflite_dynamic": Tolerance(min_top1_agreement=0.98),
    "tflite_int8": Tolerance(min_top1_agreement=0.98),
    # Quantization-aware training also fine-tunes: its int8 model is held to the same
    # agreement with the float network as post-training int8.
    "tflite_int8_qat": Tolerance(min_top1_agreement=0.98),
}


def compare(reference: np.ndarray, logits: np.ndarray, labels=None) -> dict:
    reference, logits = np.asarray(reference, np.float64), np.asarray(logits, np.float64)
    if reference.shape != logits.shape:
        raise ValueError(f"logits shape {logits.shape} != reference {reference.shape}")
    diff = float(np.max(np.abs(reference - logits)))
    out = {"images": int(len(reference)), "max_abs_diff": diff,
           "max_rel_diff": diff / max(float(np.max(np.abs(reference))), 1e-12),
           "top1_agreement": float(np.mean(np.argmax(reference, 1) == np.argmax(logits, 1)))}
    if labels is not None:
        out["top1_accuracy"] = float(np.mean(np.argmax(logits, 1) == np.asarray(labels)))
    return out


def check(name: str, metrics: dict, tolerance: Tolerance | None = None) -> tuple[bool, list]:
    """(passed, reasons) of `metrics` against the artifact's tolerance."""
    tol = tolerance or TOLERANCES.get(name, FLOAT_TOLERANCE)
    reasons = []
    if tol.max_rel_diff is not None and not metrics["max_rel_diff"] <= tol.max_rel_diff:
        reasons.append(f"max relative logit diff {metrics['max_rel_diff']:.3g} > "
                       f"{tol.max_rel_diff:g}")
    if tol.min_top1_agreement is not None and not (
            metrics["top1_agreement"] >= tol.min_top1_agreement):
        reasons.append(f"top-1 agreement {metrics['top1_agreement']:.4f} < "
                       f"{tol.min_top1_agreement:g}")
    return not reasons, reasons


def latency_ms(fn, images: np.ndarray, batch: int, runs: int = 20, warmup: int = 2) -> float:
    """Median wall time (ms) of `fn(images[:batch])` over `runs` runs after warm-up."""
    x = np.ascontiguousarray(images[:batch])
    if len(x) < batch:
        x = np.concatenate([x] * (-(-batch // len(x))))[:batch]
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def keras_predictor(model):
    """A compiled inference function of a Keras model returning numpy logits."""
    import tensorflow as tf
    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return lambda x: fn(tf.constant(x)).numpy()


def predict_batched(fn, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    return np.concatenate([fn(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
