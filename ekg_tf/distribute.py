"""Choosing the tf.distribute strategy, and jit policy."""
from __future__ import annotations

import json
import os

import tensorflow as tf

from ekg_tf.errors import UserError


def make_strategy(name: str = "mirrored") -> tf.distribute.Strategy:
    """mirrored (all visible GPUs, else the CPU) | one_device | multi_worker.

    With `TF_CONFIG` set, `MultiWorkerMirroredStrategy` is used whatever the name.
    """
    if os.environ.get("TF_CONFIG") or name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise UserError("strategy 'multi_worker' needs TF_CONFIG describing the cluster")
        json.loads(os.environ["TF_CONFIG"])  # a clear JSON error early
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy()
        cpus = tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in cpus])
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    raise UserError(f"unknown strategy {name!r}; choose mirrored, one_device or multi_worker")


def use_jit(setting) -> bool:
    """'auto' compiles with XLA on GPU only (on CPU it is ~3x slower here)."""
    if isinstance(setting, bool):
        return setting
    setting = str(setting).lower()
    if setting == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return setting in ("true", "1", "yes")


def split_cpu_devices(n: int) -> None:
    """Splits the CPU into `n` logical devices (tests of multi-replica behaviour)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])


def any_batch_spec(shape, dtype=tf.float32) -> tf.TensorSpec:
    """A TensorSpec of `dtype` tensors shaped `shape` except the batch (first) dimension,
    unknown: a tf.function traced once with it also serves a split's last, smaller batch
    (a ResNet-56 forward costs seconds to trace here, as much as ~8 batches of 256)."""
    return tf.TensorSpec([None, *shape[1:]], dtype)


def relaxed_spec(value):
    """A TypeSpec of `value` (a tensor, a per-replica value, or a nest of them) with every
    dimension unknown: a tf.function traced once with it serves every shape.

    A per-replica value's spec is rebuilt from its class (TensorFlow's PerReplicaSpec,
    whose constructor takes the component specs) since TF offers no public way to relax
    one; this is the only use of that private class.
    """
    if isinstance(value, (list, tuple)):
        return type(value)(relaxed_spec(v) for v in value)
    if isinstance(value, tf.distribute.DistributedValues):
        spec_type = type(tf.type_spec_from_value(value))
        return spec_type(*[relaxed_spec(v) for v in value.values])
    value = tf.convert_to_tensor(value)
    return tf.TensorSpec([None] * len(value.shape), value.dtype)
