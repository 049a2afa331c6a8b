"""SavedModel for TensorFlow Serving: input contracts, warmup records, versioned layout.

Layout: `<export_dir>/saved_model/<model_name>/<version>/` (TF Serving's model base
path is `<export_dir>/saved_model/<model_name>`), signature `serving_default`:
- contract `images`: float32 [N,H,W,3], already normalised;
- contract `images_uint8`: uint8 [N,H,W,3] raw RGB pixels, normalised in the graph;
- contract `image_bytes`: string [N] encoded PNG/JPEG/BMP/GIF images, decoded (and
  resized to HxW if needed) and normalised in the graph.
Outputs: `logits` float32 [N,K], `probabilities` float32 [N,K], `classes` int64 [N].
A version directory is written under a temporary name and renamed into place, so
TF Serving (which polls the base path) never sees half a model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
import keras

from ekg_tf.export.options import check_contract

OUTPUTS = ("logits", "probabilities", "classes")
SIGNATURE = "serving_default"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
METADATA_FILE = os.path.join("assets.extra", "ekg_export.json")


def input_spec(contract: str, image_shape) -> tf.TensorSpec:
    h, w, c = image_shape
    if contract == "images":
        return tf.TensorSpec([None, h, w, c], tf.float32, name="images")
    if contract == "images_uint8":
        return tf.TensorSpec([None, h, w, c], tf.uint8, name="images_uint8")
    return tf.TensorSpec([None], tf.string, name="image_bytes")


def serving_function(model: keras.Model, contract: str, normalization):
    """The `serving_default` function of `model` for `contract`; `normalization` (an
    `ekg_tf.data.preprocessing.Normalization`) turns raw pixels into model inputs."""
    check_contract(contract)
    image_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    h, w, c = image_shape

    def outputs(images):
        logits = model(images, training=False)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1),
                "classes": tf.argmax(logits, axis=-1, output_type=tf.int64)}

    def decode(data):
        image = tf.io.decode_image(data, channels=c, expand_animations=False)
        image = tf.cast(image, tf.float32)
        # Same size: bilinear resize with half-pixel centres is the identity.
        image = tf.image.resize(image, [h, w])
        return tf.ensure_shape(image, [h, w, c])

    spec = input_spec(contract, image_shape)
    if contract == "images":
        @tf.function(input_signature=[spec])
        def serve(images):
            return outputs(images)
    elif contract == "images_uint8":
        @tf.function(input_signature=[spec])
        def serve(images_uint8):
            return outputs(normalization(images_uint8))
    else:
        @tf.function(input_signature=[spec])
        def serve(image_bytes):
            pixels = tf.map_fn(decode, image_bytes, fn_output_signature=tf.float32)
            return outputs(normalization(pixels))
    return serve


def model_fingerprint(model: keras.Model, extra: str = "") -> str:
    """sha256 of the weights (and an extra string, e.g. the contract): identifies a model."""
    digest = hashlib.sha256(extra.encode())
    for w in model.get_weights():
        digest.update(str(w.shape).encode())
        digest.update(np.ascontiguousarray(w, np.float32).tobytes())
    return digest.hexdigest()


def encode_png(images: np.ndarray) -> list[bytes]:
    return [tf.io.encode_png(img).numpy() for img in np.asarray(images, np.uint8)]


def contract_inputs(contract: str, raw_uint8: np.ndarray, normalization):
    """What a client sends for `contract`, from raw uint8 images."""
    if contract == "images":
        return normalization.numpy(raw_uint8)
    if contract == "images_uint8":
        return raw_uint8.astype(np.uint8)
    return np.asarray(encode_png(raw_uint8), dtype=object)


def write_warmup(path: str, model_name: str, contract: str, samples) -> int:
    """TF Serving warmup: one PredictionLog per sample batch, as a TFRecord file."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
    count = 0
    with tf.io.TFRecordWriter(path) as writer:
        for batch in samples:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SIGNATURE))
            request.inputs[contract].CopyFrom(tf.make_tensor_proto(batch))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
            count += 1
    return count


def read_warmup(path: str) -> list:
    """Parses a warmup file into PredictionLog protos (raises on a malformed record)."""
    from tensorflow_serving.apis import prediction_log_pb2
    logs = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        logs.append(log)
    return logs


def models_config(model_name: str, mount: str = "/models/ekg") -> str:
    """A TF Serving `models.config` serving the latest version (export dir mounted at `mount`)."""
    return (f'model_config_list {{\n  config {{\n    name: "{model_name}"\n'
            f'    base_path: "{mount}/saved_model/{model_name}"\n'
            f'    model_platform: "tensorflow"\n'
            f'    model_version_policy {{ latest {{ num_versions: 1 }} }}\n  }}\n}}\n')


def existing_versions(base: str) -> list[int]:
    if not os.path.isdir(base):
        return []
    return sorted(int(d) for d in os.listdir(base) if d.isdigit())


def write_saved_model(model: keras.Model, version_path: str, contract: str, normalization,
                      model_name: str, warmup_raw_uint8=None, metadata: dict | None = None) -> str:
    """Writes the serving SavedModel to `version_path` (which must not exist), atomically."""
    if os.path.exists(version_path):
        raise FileExistsError(f"{version_path} already exists; refusing to overwrite it")
    parent = os.path.dirname(os.path.abspath(version_path))
    os.makedirs(parent, exist_ok=True)
    # A temp name TF Serving ignores (not all digits), renamed when complete.
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(SIGNATURE, serving_function(model, contract, normalization))
        out = os.path.join(tmp, "model")
        archive.write_out(out, verbose=False)
        os.makedirs(os.path.join(out, "assets.extra"), exist_ok=True)
        if warmup_raw_uint8 is not None and len(warmup_raw_uint8):
            raw = np.asarray(warmup_raw_uint8)
            samples = [contract_inputs(contract, raw[:1], normalization),
                       contract_inputs(contract, raw, normalization)]
            write_warmup(os.path.join(out, WARMUP_FILE), model_name, contract, samples)
        with open(os.path.join(out, METADATA_FILE), "w") as f:
            json.dump(metadata or {}, f, indent=1)
        os.rename(out, version_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return version_path


# A standalone check run in a fresh interpreter: plain TensorFlow only (no ekg_tf).
_FRESH_PROCESS_CHECK = r"""
import json, os, statistics, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import tensorflow as tf
path, inputs_path, out_path, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
loaded = tf.saved_model.load(path)
fn = loaded.signatures["serving_default"]
name = list(fn.structured_input_signature[1])[0]
data = np.load(inputs_path, allow_pickle=True)
x = data["x"]
if x.dtype == object:
    x = x.astype(bytes)
outs = {k: [] for k in ("logits", "probabilities", "classes")}
for i in range(0, len(x), 250):
    res = fn(**{name: tf.constant(x[i:i + 250])})
    for k in outs:
        outs[k].append(res[k].numpy())
latency = {}
for b in (1, 32):
    xb = tf.constant(x[:b])
    fn(**{name: xb})
    times = []
    for _ in range(runs):
        t = time.perf_counter(); fn(**{name: xb})["logits"].numpy(); times.append(time.perf_counter() - t)
    latency[f"batch{b}_ms"] = 1000 * statistics.median(times)
np.savez(out_path, **{k: np.concatenate(v) for k, v in outs.items()})
print(json.dumps({"input": name, "ekg_tf_imported": "ekg_tf" in sys.modules,
                  "outputs": sorted(fn.structured_outputs), "latency": latency}))
"""


def run_in_fresh_process(version_path: str, inputs, runs: int = 10, workdir=None) -> dict:
    """Loads the SavedModel with plain TensorFlow in a new Python process and runs `inputs`.

    Returns {"logits", "probabilities", "classes", "input", "outputs", "latency",
    "ekg_tf_imported"}; raises RuntimeError with the child's stderr on failure.
    """
    import subprocess
    import sys
    tmp = tempfile.mkdtemp(dir=workdir, prefix=".tmp-")  # removed by a re-run if killed
    try:
        in_path, out_path = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(in_path, x=np.asarray(inputs))
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("PYTHONPATH", None)  # plain TensorFlow: the project is not importable
        proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_CHECK, version_path,
                               in_path, out_path, str(runs)], capture_output=True, text=True,
                              env=env, cwd=tmp, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"loading {version_path} in a fresh process failed:\n"
                               f"{proc.stderr[-3000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        with np.load(out_path) as f:
            info.update({k: f[k] for k in f.files})
        return info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
