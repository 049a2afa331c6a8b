"""`train.precision`: float32 | mixed_bfloat16 | mixed_float16 for the training step.

Mixed precision here is Keras' (`keras.DTypePolicy("mixed_...")`): layers compute in
bfloat16/float16 while every variable stays float32 (the master weights, which the
optimizer updates in float32), BatchNormalization computes its statistics in float32
(Keras upcasts; so does `fused_bn`), and the losses cast the logits to float32 first.
mixed_float16 adds Keras' dynamic loss scaling (`LossScaleOptimizer`: a step whose
gradients are not finite is skipped and the scale halved); bfloat16 has float32's
exponent range and needs none.

Only the training step (and, with `search.memory_bank_precision`, the memory bank's
teachers) computes in reduced precision: `compute_precision(model, p)` sets the layers'
policies while the step is traced and restores float32 after, so evaluation, BN
re-estimation, saved `.keras` files and exports stay float32.
"""
from __future__ import annotations

import contextlib

import keras

from ekg_tf.errors import UserError
from ekg_tf.graph import keras_compat
from ekg_tf.utils.context import attribute_set

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def check_precision(precision: str, key: str = "train.precision") -> str:
    """`precision` if it is one of PRECISIONS (None/empty: float32); else a UserError
    naming the config `key`."""
    precision = str(precision or "float32")
    if precision not in PRECISIONS:
        raise UserError(f"unknown {key} {precision!r}; choose one of {PRECISIONS}")
    return precision


@contextlib.contextmanager
def compute_precision(model, precision: str):
    """Within it the model's layers compute in `precision` (variables stay float32)."""
    precision = check_precision(precision)
    if precision == "float32":
        yield model
        return
    layers = [model] + [l for l in keras_compat.all_layers(model) if l is not model]
    with attribute_set(layers, "dtype_policy", precision):
        yield model


def wrap_optimizer(optimizer, precision: str):
    """mixed_float16: the optimizer with dynamic loss scaling; else unchanged."""
    if check_precision(precision) == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def loss_scale(optimizer):
    """The dynamic loss scale variable, or None without loss scaling."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.dynamic_scale
    return None
