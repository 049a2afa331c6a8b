"""TFLite conversion (from a SavedModel) and a LiteRT runner.

Modes (`--quantize`): `none` (float32), `float16` (float16 weights), `dynamic`
(dynamic-range: int8 weights, float activations), `int8` (full integer: int8
weights and activations calibrated on a representative dataset drawn from the
*training* data; with `int8_io` the model's input/output tensors are int8 too).
Full-int8 activation ranges are MSE-optimal by default (`export/int8_calibration.py`);
`calibration="minmax"` keeps the converter's observed [min, max].
Edge models take normalised float32 images `images` and return `logits`.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from ekg_tf.errors import UserError
from ekg_tf.export import int8_calibration
from ekg_tf.export.options import check_calibration, check_modes


def artifact_name(mode: str) -> str:
    return "tflite_float32" if mode == "none" else f"tflite_{mode}"


def convert(saved_model_dir: str, mode: str, representative_images=None,
            int8_io: bool = False, calibration: str = "mse") -> bytes:
    """Converts the `serving_default` signature of a SavedModel to a TFLite flatbuffer."""
    check_modes([mode])
    check_calibration(calibration)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir,
                                                         signature_keys=["serving_default"])
    if mode == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif mode == "int8":
        if representative_images is None or len(representative_images) == 0:
            raise UserError("int8 quantization needs representative (training) images")
        images = np.asarray(representative_images, np.float32)

        def representative():
            for i in range(len(images)):
                yield [images[i:i + 1]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        if calibration == "mse":
            return int8_calibration.convert_int8_mse(converter, images, int8_io)
    return converter.convert()


class TFLiteRunner:
    """Runs a .tflite model with LiteRT (XNNPACK for float ops), any batch size."""

    def __init__(self, model_path: str, num_threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter
        self.num_threads = num_threads
        self.interpreter = Interpreter(model_path=model_path, num_threads=num_threads)
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._batch = None

    @property
    def input_dtype(self):
        return self._input["dtype"]

    def _resize(self, batch: int):
        if batch != self._batch:
            shape = list(self._input["shape"])
            shape[0] = batch
            self.interpreter.resize_tensor_input(self._input["index"], shape)
            self.interpreter.allocate_tensors()
            self._input = self.interpreter.get_input_details()[0]
            self._output = self.interpreter.get_output_details()[0]
            self._batch = batch

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Normalised float32 images -> float32 logits (quantizes int8 inputs itself)."""
        self._resize(len(images))
        x = np.asarray(images, np.float32)
        if self._input["dtype"] == np.int8:
            scale, zero = self._input["quantization"]
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
        self.interpreter.set_tensor(self._input["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self._output["index"])
        if self._output["dtype"] == np.int8:
            scale, zero = self._output["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return np.asarray(y, np.float32)

    def predict(self, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
        return np.concatenate([self(images[i:i + batch_size])
                               for i in range(0, len(images), batch_size)])
