"""Latency of sub-networks on deployment runtimes (TFLite/XNNPACK, onnxruntime): timed
blocks cached per runtime, threads, batch and machine, and the predictor the search's
latency target reads (see `model.LatencyModel`)."""
from ekg_tf.latency.model import LatencyModel
from ekg_tf.latency.runtimes import RUNTIMES, Runtime, check_runtime
from ekg_tf.latency.table import LatencyTable, default_cache_dir

__all__ = ["LatencyModel", "LatencyTable", "RUNTIMES", "Runtime", "check_runtime",
           "default_cache_dir"]
