"""Deployment export of physically pruned EKG models: SavedModel (TF Serving), TFLite, ONNX.

Depends on the `ekg_tf` core; the core never imports this package. It installs as
`ekg_tf.export`, the name of the Python API's export function too: the package is
callable, `ekg_tf.export(model, export_dir, ...)` is `ekg_tf.api.export`.
"""
import sys
import types


class _ExportPackage(types.ModuleType):
    """`ekg_tf.export(...)` calls `ekg_tf.api.export` once the package is imported (before,
    `ekg_tf.export` is that function itself)."""

    def __call__(self, *args, **kwargs):
        from ekg_tf.api import export
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _ExportPackage
