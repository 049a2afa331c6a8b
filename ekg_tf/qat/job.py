"""What the QAT worker process is asked to do: one JSON file, written by the caller.

The caller (Keras 3) and the worker (tf-keras + tfmot) share nothing but files:
the float network as a `.keras` file, the experiment config as JSON, optional
training arrays as `.npy`, and the memory bank directory. This module imports
neither Keras nor tfmot, so both sides can use it.
"""
from __future__ import annotations

import dataclasses
import json
import os

from ekg_tf.utils.io import atomic_write_json

FILES = {
    "float_model": "float.keras",        # the float network the QAT starts from (Keras 3)
    "tflite": "model_int8_qat.tflite",   # the full-int8 TFLite of the trained QAT model
    "result": "result.json",             # the worker's result (written last)
    "qat_logits": "qat_keras_logits.npy",  # the QAT Keras model's logits on verify_images
}


@dataclasses.dataclass
class QATJob:
    out_dir: str                  # workdir/qat: checkpoints, TensorBoard, outputs
    config: dict                  # the experiment config (ml_collections, as a dict)
    mode: str                     # ekg (memory bank) | float (the float network) | plain (CE)
    bank_dir: str | None = None   # the memory bank (mode ekg)
    train_x: str | None = None    # .npy training images (model-ready); None: config.data
    train_y: str | None = None
    test_x: str | None = None     # .npy evaluation images per epoch; None: config.data test
    test_y: str | None = None
    verify_images: str | None = None  # .npy model-ready images: QAT Keras logits for them
    float_fingerprint: str = ""   # of the float weights (a resumed run must start from them)

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, FILES[name])

    def write(self, path: str) -> None:
        atomic_write_json(path, dataclasses.asdict(self))

    @classmethod
    def read(cls, path: str) -> "QATJob":
        with open(path) as f:
            return cls(**json.load(f))
