"""Loading weights: the reference's published checkpoints (.npz / .pkl) and our own.

The reference names variables `BasicBlock{s}.{b}/conv1/kernel:0`, `bn/gamma:0`
(BN arrays shaped (1,1,1,C)), `fc/biases:0` (shaped (1,classes)). Every array
must map to exactly one model variable of the same size; anything missing,
extra or mis-shaped is an error naming the variable.

`.pkl` files are read with a restricted unpickler that admits numpy arrays and
plain containers only; anything else is refused before it is constructed.
"""
from __future__ import annotations

from ekg_tf.errors import UserError
import io
import os
import pickle
import re
import zipfile

import numpy as np


class WeightsError(UserError):
    """A weights file that cannot be loaded into the model (says why and what to fix)."""


_SAFE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"), ("builtins", "dict"), ("builtins", "list"),
    ("builtins", "tuple"), ("builtins", "set"), ("builtins", "frozenset"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS or (module.startswith("numpy") and name.endswith("DType")):
            return super().find_class(module, name)
        raise WeightsError(
            f"refusing to unpickle {module}.{name}: only numpy arrays and plain containers "
            "are allowed in a weights .pkl")


def read_reference_pickle(path: str) -> dict[str, np.ndarray]:
    """Reads the reference's .pkl checkpoint safely (no arbitrary objects)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except WeightsError:
        raise
    except Exception as e:  # truncated or not a pickle
        raise WeightsError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a dict of arrays, found {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise WeightsError(f"{path}: entry {key!r} is {type(value).__name__}, not an array")
        out[str(key)] = value
    return out


def read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise WeightsError(f"{path}: not a readable .npz file ({type(e).__name__}: {e}); "
                           "re-download or re-create it") from None


def read_weight_arrays(path: str) -> dict[str, np.ndarray]:
    """Arrays keyed by variable name from a .npz or .pkl file."""
    if not os.path.exists(path):
        raise WeightsError(f"weights file {path!r} does not exist")
    if path.endswith(".pkl"):
        return read_reference_pickle(path)
    if path.endswith(".npz"):
        return read_npz(path)
    raise WeightsError(f"{path}: unknown weights format; use .npz/.pkl (reference), "
                       ".weights.h5 (Keras) or a checkpoint")


_BLOCK = re.compile(r"^BasicBlock(\d+)\.(\d+)/")


def reference_to_keras_name(name: str) -> str:
    """'BasicBlock1.0/bn3/gamma:0' -> 'block1_0_bn3/gamma'; 'fc/biases:0' -> 'fc/bias'."""
    name = name.split(":")[0]
    name = _BLOCK.sub(lambda m: f"block{m.group(1)}_{m.group(2)}_", name)
    if name.endswith("/biases"):
        name = name[: -len("biases")] + "bias"
    return name


def _model_variables(model) -> dict[str, object]:
    """{'layer/variable': variable} of a plain (functional) model."""
    model = getattr(model, "base", model)  # a gated clone holds the model's variables
    prefix = model.name + "/"
    out = {}
    for v in model.weights:
        path = v.path[len(prefix):] if v.path.startswith(prefix) else v.path
        out[path] = v
    return out


def assign_arrays(model, arrays: dict[str, np.ndarray], source: str = "weights") -> None:
    """Assigns reference-named (or model-named) arrays to the model, strictly."""
    variables = _model_variables(model)
    mapped = {}
    for key, value in arrays.items():
        name = reference_to_keras_name(key)
        if name not in variables:
            raise WeightsError(
                f"{source}: array {key!r} has no variable {name!r} in {model.name} "
                f"(is this a checkpoint of another architecture?)")
        mapped[name] = (key, value)
    missing = sorted(set(variables) - set(mapped))
    if missing:
        raise WeightsError(f"{source}: {len(missing)} variable(s) of {model.name} missing from "
                           f"the file, e.g. {missing[:3]} (is this a checkpoint of another "
                           "architecture?)")
    for name, (key, value) in mapped.items():
        var = variables[name]
        if int(np.prod(value.shape)) != int(np.prod(var.shape)):
            raise WeightsError(f"{source}: array {key!r} has shape {value.shape}, variable "
                               f"{name!r} needs {tuple(var.shape)}")
    for name, (key, value) in mapped.items():
        var = variables[name]
        var.assign(np.asarray(value, np.float32).reshape(var.shape))


def load_weights(model, path: str) -> None:
    """Loads weights from .npz/.pkl (reference names), .weights.h5, or a TF checkpoint
    into a plain model (or into the model behind a gated clone)."""
    model = getattr(model, "base", model)
    if path.endswith(".weights.h5"):
        if not os.path.exists(path):
            raise WeightsError(f"weights file {path!r} does not exist")
        try:
            model.load_weights(path)
        except Exception as e:
            raise WeightsError(f"{path}: does not fit {model.name} ({e})") from None
        return
    if path.endswith((".npz", ".pkl")):
        assign_arrays(model, read_weight_arrays(path), source=path)
        return
    # A training checkpoint prefix or a workdir/checkpoints directory.
    import tensorflow as tf
    ckpt_path = path
    if os.path.isdir(path):
        ckpt_path = tf.train.latest_checkpoint(path) or tf.train.latest_checkpoint(
            os.path.join(path, "checkpoints"))
    if not ckpt_path or not tf.io.gfile.exists(ckpt_path + ".index"):
        raise WeightsError(f"{path!r}: not a weights file (.npz, .pkl, .weights.h5) nor a "
                           "checkpoint or directory holding one")
    try:
        tf.train.Checkpoint(model=model).restore(ckpt_path).expect_partial().assert_existing_objects_matched()
    except Exception as e:
        raise WeightsError(f"{ckpt_path}: checkpoint does not fit {model.name} ({e})") from None
