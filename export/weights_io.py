"""Which weights to export and how to turn them into the slim Keras model.

Fine-tuned weights live in `workdir/finetune/` (FINETUNED_CANDIDATES, in order);
they may be a slim `.keras` model, a slim model's `.weights.h5`, or gated-model
weights (.npz/.pkl/.weights.h5/checkpoint), which are slimmed with the spec.
"""
from __future__ import annotations

import os

from ekg_tf.cli import common

# Where the fine-tuning stage (ekg_tf/finetune/runner.py) leaves its plain Keras
# models, in order of preference.
from ekg_tf.errors import UserError
FINETUNED_CANDIDATES = ("best.keras", "last.keras", "best.weights.h5", "last.weights.h5")
# The search's adapted gated weights (the ranks of subnet.json were computed on them).
SEARCH_WEIGHTS = os.path.join("search", "weights.weights.h5")


def find_weights(workdir: str, flag_value: str | None, init: str) -> tuple[str, bool]:
    """(path, fine_tuned) of the weights to export.

    Order: --weights; workdir/finetune/{best,last}.keras (fine-tuned); the search's
    adapted weights workdir/search/weights.weights.h5; config.model.init.
    """
    if flag_value:
        if not os.path.exists(flag_value) and not os.path.exists(flag_value + ".index"):
            raise UserError(f"--weights {flag_value!r} does not exist")
        return flag_value, os.path.abspath(flag_value).startswith(
            os.path.abspath(os.path.join(workdir, "finetune")))
    for name in FINETUNED_CANDIDATES:
        path = os.path.join(workdir, "finetune", name)
        if os.path.exists(path):
            return path, True
    search_weights = os.path.join(workdir, SEARCH_WEIGHTS)
    if os.path.exists(search_weights):
        return search_weights, False
    if not init:
        raise common.UserError(f"no weights: nothing fine-tuned in {workdir}/finetune/ "
                               f"({', '.join(FINETUNED_CANDIDATES)}), no {SEARCH_WEIGHTS}, "
                               "no --weights and no config.model.init")
    return init, False


def load_slim(config, spec, weights: str):
    """(slim Keras model, gated clone or None) for the spec and weights."""
    import keras
    from ekg_tf.models.sources import model_kind
    from ekg_tf.slimming import slim_model
    model = common.build_model_from_config(config, load_init=False, gated=True)
    spec.check_fits(model)
    if weights == str(config.model.init or "") and model_kind(weights) != "builtin":
        spec.apply_to(model)  # a .keras file or an application: the model holds its weights
        return slim_model(model, spec), model
    if weights.endswith(".keras"):
        slim = keras.models.load_model(weights, compile=False, safe_mode=True)
        expected = slim_model(model, spec)
        shapes = [tuple(w.shape) for w in slim.weights]
        if shapes != [tuple(w.shape) for w in expected.weights]:
            raise UserError(f"{weights}: the model's shapes do not fit the sub-network spec")
        return slim, None
    from ekg_tf.weights import WeightsError, load_weights
    if weights.endswith(".weights.h5") and _h5_shapes(weights) == sorted(
            tuple(w.shape) for w in slim_model(model, spec).weights):
        # The fine-tuned slim model's weights (Keras does not refuse a mismatched
        # .weights.h5, so the file's shapes decide which model it belongs to).
        slim = slim_model(model, spec)
        slim.load_weights(weights)
        return slim, None
    try:
        load_weights(model, weights)
    except WeightsError as e:
        raise UserError(str(e)) from None
    spec.apply_to(model)
    return slim_model(model, spec), model


def _h5_shapes(path: str) -> list:
    import h5py
    shapes = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: shapes.append(tuple(obj.shape))
                     if isinstance(obj, h5py.Dataset) else None)
    return sorted(shapes)


def sample_indices(n_total: int, n: int, seed: int = 0):
    import numpy as np
    n = min(int(n), n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, n, replace=False))


