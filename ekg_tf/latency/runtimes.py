"""Deployment runtimes a latency is measured on: LiteRT (TFLite, XNNPACK) and onnxruntime.

A `Runtime(name, threads)` turns a plain (BN-folded) Keras model into a runnable
session of that runtime, exactly as `ekg-export` ships it: float32 TFLite through the
TFLite converter (LiteRT interpreter, XNNPACK delegate), or ONNX through tf2onnx
(opset 17) run by onnxruntime's CPU provider with `onnx_session_options`. The
session settings live here, once, so that the latency model times what the export
runs. `Runtime.describe()` states them (the export report prints it).

    rt = Runtime("onnxruntime", threads=2)
    session = rt.session(folded_keras_model)     # session(x) -> logits (numpy)
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import time

import numpy as np

from ekg_tf.errors import UserError

RUNTIMES = ("tflite", "onnxruntime")
ONNX_OPSET = 17


def check_runtime(name: str) -> str:
    if name not in RUNTIMES:
        raise UserError(f"search.runtime must be one of {RUNTIMES} (the runtime whose latency "
                         f"is modelled), got {name!r}")
    return name


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def machine_id() -> str:
    """The CPU a latency was measured on (latencies of another CPU do not apply)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()}"


def onnx_session_options(threads: int):
    """onnxruntime settings of every ONNX session ekg_tf runs (export, latency model).

    Measured on the published ResNet-56 (docs/latency.md): all graph optimisations
    (constant folding, Conv+bias+ReLU fusion, the NCHWc layout of MLAS), `threads`
    intra-op threads, one inter-op thread, sequential execution.
    """
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    return options


ONNX_SETTINGS = {"graph_optimization_level": "ORT_ENABLE_ALL",
                 "execution_mode": "ORT_SEQUENTIAL", "inter_op_num_threads": 1,
                 "provider": "CPUExecutionProvider", "layout": "NHWC input (tf2onnx moves "
                 "the transposes to the input; the convolutions run in NCHW/NCHWc)"}


def edge_saved_model(model, path: str) -> str:
    """A float SavedModel of `model` (signature `serving_default`: input `images`, output
    `logits`), what the TFLite converter reads."""
    import keras
    import tensorflow as tf
    archive = keras.export.ExportArchive()
    archive.track(model)
    shape = [None, *(int(d) for d in model.inputs[0].shape[1:])]
    archive.add_endpoint("serving_default", tf.function(
        lambda images: {"logits": model(images, training=False)},
        input_signature=[tf.TensorSpec(shape, tf.float32, name="images")]))
    archive.write_out(path, verbose=False)
    return path


def tflite_bytes(model) -> bytes:
    """Float32 TFLite flatbuffer of a Keras model, converted from its SavedModel as the
    export does (a conversion from concrete functions gives a graph that XNNPACK runs
    ~7x slower here)."""
    import tempfile
    import tensorflow as tf
    with tempfile.TemporaryDirectory(prefix="ekg-tflite-") as tmp:
        path = edge_saved_model(model, os.path.join(tmp, "edge"))
        converter = tf.lite.TFLiteConverter.from_saved_model(
            path, signature_keys=["serving_default"])
        return converter.convert()


def onnx_proto(model, opset: int = ONNX_OPSET):
    """ONNX ModelProto (tf2onnx, opset 17) of a Keras model (input `images`, output
    `logits`, NHWC as the Keras model)."""
    import tensorflow as tf
    import tf2onnx
    shape = [None, *(int(d) for d in model.inputs[0].shape[1:])]
    fn = tf.function(lambda images: {"logits": model(images, training=False)})
    proto, _ = tf2onnx.convert.from_function(
        fn, input_signature=[tf.TensorSpec(shape, tf.float32, name="images")], opset=opset)
    return proto


class TFLiteSession:
    """A LiteRT interpreter (XNNPACK for float ops) at a fixed batch size."""

    def __init__(self, content: bytes, threads: int):
        from ai_edge_litert.interpreter import Interpreter
        self.interpreter = Interpreter(model_content=content, num_threads=int(threads))
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._batch = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if len(x) != self._batch:
            shape = list(self._input["shape"])
            shape[0] = len(x)
            self.interpreter.resize_tensor_input(self._input["index"], shape)
            self.interpreter.allocate_tensors()
            self._batch = len(x)
        self.interpreter.set_tensor(self._input["index"], x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._output["index"])


class OnnxSession:
    """An onnxruntime CPU session with `onnx_session_options`."""

    def __init__(self, content: bytes | str, threads: int):
        import onnxruntime as ort
        self.session = ort.InferenceSession(content, onnx_session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self._output], {self._input: x})[0]


@dataclasses.dataclass(frozen=True)
class Runtime:
    """A deployment runtime at a number of threads (see the module docstring)."""
    name: str
    threads: int = 2

    def __post_init__(self):
        check_runtime(self.name)
        if isinstance(self.threads, bool) or int(self.threads) != self.threads \
                or int(self.threads) < 1:
            raise UserError(f"the runtime's threads must be an integer >= 1, "
                             f"got {self.threads!r}")

    @property
    def version(self) -> str:
        """What produced and runs the model: converter and runtime versions."""
        if self.name == "tflite":
            return f"tensorflow-{_version('tensorflow')}+litert-{_version('ai-edge-litert')}"
        settings = hashlib.sha1(json.dumps(ONNX_SETTINGS, sort_keys=True).encode()).hexdigest()
        return (f"tf2onnx-{_version('tf2onnx')}+onnxruntime-{_version('onnxruntime')}"
                f"+opset{ONNX_OPSET}+settings-{settings[:8]}")

    @property
    def label(self) -> str:
        if self.name == "tflite":
            return f"tflite (XNNPACK, {self.threads} thr)"
        return f"onnxruntime ({self.threads} thr)"

    def describe(self) -> dict:
        out = {"runtime": self.name, "threads": self.threads, "version": self.version}
        if self.name == "onnxruntime":
            out.update(ONNX_SETTINGS, intra_op_num_threads=self.threads)
        else:
            out.update(delegate="XNNPACK (LiteRT default for float32)",
                       num_threads=self.threads)
        return out

    def convert(self, model) -> bytes:
        if self.name == "tflite":
            return tflite_bytes(model)
        return onnx_proto(model).SerializeToString()

    def session(self, model=None, content: bytes | None = None):
        """A callable session of a Keras model (or of already converted `content`)."""
        content = self.convert(model) if content is None else content
        if self.name == "tflite":
            return TFLiteSession(content, self.threads)
        return OnnxSession(content, self.threads)


def wall_times_alone(openers: list, x: np.ndarray, runs: int = 20, rounds: int = 5,
                     warmup: int = 3) -> list[list[float]]:
    """Wall ms of every timed run of each network, one session alive at a time.

    `openers` are callables that open a session (`session(x) -> output`). With several
    networks, every round opens each network's session, warms it up, times
    `runs // rounds` runs and closes it, in alternation, so that load changes on a shared
    machine hit all alike. Two live onnxruntime sessions time each other: the idle one's
    intra-op threads spin-wait on the cores the other one runs on (on this 2-core machine
    the dense ResNet-56 at batch 1, 2 threads, measured 1.26-5.30 ms per pair beside a
    second live session, 1.23-2.32 ms alone). A single network is opened once."""
    x = np.ascontiguousarray(x, np.float32)
    per_round = max(1, runs // rounds)
    if len(openers) == 1:  # nothing to alternate with
        fn = openers[0]()
        _warm_up(fn, x, warmup)
        return [_timed_runs(fn, x, per_round * rounds)]
    times = [[] for _ in openers]
    for _ in range(rounds):
        for open_session, out in zip(openers, times):
            fn = open_session()
            _warm_up(fn, x, warmup)
            out += _timed_runs(fn, x, per_round)
            del fn  # closed before the next network's session opens
    return times


def _warm_up(fn, x, runs: int):
    for _ in range(runs):
        fn(x)


def _timed_runs(fn, x, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x)
        out.append(1000.0 * (time.perf_counter() - start))
    return out


def time_alone(openers: list, x: np.ndarray, runs: int = 20, rounds: int = 5,
               warmup: int = 3) -> list[float]:
    """Median wall ms of each network (`wall_times_alone`)."""
    return [statistics.median(t) for t in wall_times_alone(openers, x, runs, rounds, warmup)]
