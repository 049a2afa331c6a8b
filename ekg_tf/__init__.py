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


def _find_source_tree_export():
    """`ekg_tf.export` is the repository's top-level `export/` folder (setup.py maps it
    there when installing). Run from a source checkout (PYTHONPATH=<repo>), nothing is
    installed: a finder maps the name onto that folder, and only that name."""
    import importlib.abc
    import importlib.util
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join(os.path.dirname(here), "export")
    if os.path.isdir(os.path.join(here, "export")) or not os.path.isfile(
            os.path.join(folder, "__init__.py")):
        return  # installed copy, or no export/ beside the package

    class SourceTreeExport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "ekg_tf.export":
                return None
            return importlib.util.spec_from_file_location(
                name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])

    if not any(type(f).__name__ == "SourceTreeExport" for f in sys.meta_path):
        sys.meta_path.append(SourceTreeExport())


_find_source_tree_export()

__version__ = "0.2.0"

_API = {"prune": "ekg_tf.api", "search": "ekg_tf.api", "slim": "ekg_tf.api",
        "export": "ekg_tf.api", "dependency_graph": "ekg_tf.api", "PruneResult": "ekg_tf.api",
        "run_pipeline": "ekg_tf.api", "run_train": "ekg_tf.api", "run_search": "ekg_tf.api",
        "run_finetune": "ekg_tf.api", "run_export": "ekg_tf.api",
        "SubnetSpec": "ekg_tf.subnet", "GatedModel": "ekg_tf.graph.gated",
        "quantize_aware": "ekg_tf.qat"}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        import importlib
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'ekg_tf' has no attribute {name!r}")
