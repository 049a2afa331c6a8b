"""Deployment export of physically pruned EKG models: SavedModel (TF Serving), TFLite, ONNX.

Depends on `ekg_tf`; `ekg_tf` never imports this package.
"""
