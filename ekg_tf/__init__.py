"""ekg_tf: EKG filter pruning (ECCV 2022) for TensorFlow 2 / Keras 3."""
import os

# Keras 3 must run on TensorFlow: the gates, the distributed loop and the
# exporters all use tf ops directly.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"
