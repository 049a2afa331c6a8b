"""ekg_tf: EKG filter pruning (ECCV 2022) for TensorFlow 2 / Keras 3.

    import ekg_tf
    result = ekg_tf.prune(model, train_data, val_data, target_macs=0.45)
    ekg_tf.export(result.model, "out/", formats=("saved_model", "tflite", "onnx"))

See `ekg_tf.api` (and docs/api.md). The API is imported on first use, so that
`import ekg_tf` stays light.
"""
import os

# Keras 3 must run on TensorFlow: the gates, the distributed loop and the
# exporters all use tf ops directly.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.2.0"

_API = {"prune": "ekg_tf.api", "search": "ekg_tf.api", "slim": "ekg_tf.api",
        "export": "ekg_tf.api", "dependency_graph": "ekg_tf.api", "PruneResult": "ekg_tf.api",
        "SubnetSpec": "ekg_tf.subnet", "GatedModel": "ekg_tf.graph.gated",
        "quantize_aware": "ekg_tf.qat"}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        import importlib
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'ekg_tf' has no attribute {name!r}")
