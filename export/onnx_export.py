"""ONNX export with tf2onnx, checked with onnx.checker, run with onnxruntime.

The ONNX model takes normalised float32 `images` [N,H,W,3] (NHWC, as the Keras
model) and returns `logits`.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import keras

from ekg_tf.errors import UserError
from ekg_tf.utils.io import atomic_path


def convert(model: keras.Model, path: str, opset: int = 17):
    """Writes `model` as ONNX (opset `opset`) to `path`; returns the checked ModelProto."""
    import onnx
    import tf2onnx
    if not 7 <= int(opset) <= 21:
        raise UserError(f"export.opset must be an ONNX opset tf2onnx supports (7..21), got {opset}")
    shape = [None, *(int(d) for d in model.inputs[0].shape[1:])]
    fn = tf.function(lambda images: {"logits": model(images, training=False)})
    proto, _ = tf2onnx.convert.from_function(
        fn, input_signature=[tf.TensorSpec(shape, tf.float32, name="images")], opset=int(opset))
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)
    return proto


class OnnxRunner:
    """onnxruntime CPU session with a fixed number of intra-op threads."""

    def __init__(self, path: str, num_threads: int = 2):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        self.num_threads = num_threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {self.input_name: np.asarray(images, np.float32)})[0]

    def predict(self, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
        return np.concatenate([self(images[i:i + batch_size])
                               for i in range(0, len(images), batch_size)])
