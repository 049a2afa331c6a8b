"""Export chain: gated == slim Keras == SavedModel (fresh process) == TFLite float32 == ONNX,
quantized TFLite agreement, TF Serving signature/warmup, version policy.

Tolerances: float artifacts max |logits - slim Keras| <= 1e-4 * max |slim Keras logits|
(measured ~1e-7 on ResNet-20, ~2e-6 on ResNet-56) and top-1 agreement >= 99.9%;
dynamic-range / int8 TFLite: top-1 agreement with Keras >= 98% (the report's verdict).

The ResNet-56 sub-network is a real EKG search result: the published weights searched
to 0.45 MACs on real CIFAR-10 (conftest's `searched_resnet56`, a reduced-cost search),
exported the way `ekg-export` does it for search output that is not fine-tuned: BN
statistics re-estimated on 2,048 training images, verification on the 1,000 lossless
test images.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ekg_tf.data import normalize  # noqa: E402
from ekg_tf.data.sources import synthetic_split  # noqa: E402
from ekg_tf.data.preprocessing import normalization_for  # noqa: E402
from ekg_tf.flops import ComplexityCounter  # noqa: E402
from ekg_tf.graph.gated import GatedModel  # noqa: E402
from ekg_tf.models import build_model  # noqa: E402
from ekg_tf.slimming import (fold_batch_norm, recalibrate_batch_norm,  # noqa: E402
                         slim_model)
from ekg_tf.subnet import SubnetSpec  # noqa: E402
from ekg_tf.errors import UserError  # noqa: E402
from ekg_tf.export import saved_model as sm, tflite  # noqa: E402
from ekg_tf.export.exporter import ExportRequest, export_all, resolve_version  # noqa: E402
from ekg_tf.export.onnx_export import OnnxRunner  # noqa: E402
from ekg_tf.export.weights_io import load_slim  # noqa: E402
from random_subnets import random_subnet, randomize_batch_norm  # noqa: E402

CIFAR = dict(normalization=normalization_for("cifar10"))
FLOAT_REL_TOL = 1e-4
RES56 = os.path.join(SHARED, "reference", "res56_cifar10.npz")
TRAIN = os.path.join(SHARED, "data", "cifar10", "cifar10_train.npz")
TEST1000 = os.path.join(SHARED, "data", "cifar10", "cifar10_test1000_lossless.npz")


def rel_diff(ref, out):
    return float(np.abs(np.asarray(ref) - np.asarray(out)).max() / np.abs(ref).max())


def by_name(report):
    return {a["name"]: a for a in report["artifacts"]}


def saved_model_cli():
    path = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(path):
        pytest.skip(f"saved_model_cli not found next to {sys.executable}")
    return path


# ----------------------------------------------------------------- ResNet-20, random sub-network

@pytest.fixture(scope="module")
def r20(tmp_path_factory):
    rng = np.random.default_rng(0)
    model = GatedModel(build_model("resnet20", 10))
    randomize_batch_norm(model, rng)
    spec = random_subnet(model, rng, min_rate=0.1)
    data = synthetic_split(200, 10, 32, seed=5)
    x = normalize(data.x, "cifar10").numpy()
    slim = slim_model(model, spec)
    export_dir = str(tmp_path_factory.mktemp("r20_export"))
    report = export_all(ExportRequest(
        slim=slim, export_dir=export_dir, **CIFAR, verify_uint8=data.x, verify_labels=data.y,
        formats=("saved_model", "tflite", "onnx"), quant_modes=("none", "float16"),
        contract="image_bytes", latency_runs=3), progress=lambda m: None)
    return dict(model=model, spec=spec, slim=slim, x=x, data=data, report=report,
                export_dir=export_dir, gated_logits=model(x).numpy())


def test_r20_chain_parity(r20):
    """gated == slim == SavedModel (PNG bytes in, fresh process) == TFLite float32 == ONNX."""
    gated, report = r20["gated_logits"], r20["report"]
    assert report["status"] == "ok", report
    assert rel_diff(gated, r20["slim"](r20["x"]).numpy()) <= FLOAT_REL_TOL
    arts = by_name(report)
    for name in ("keras_folded", "saved_model", "tflite_float32", "onnx"):
        assert arts[name]["max_rel_diff"] <= FLOAT_REL_TOL, arts[name]
        assert arts[name]["top1_agreement"] == 1.0
    assert arts["tflite_float16"]["status"] == "ok"
    assert arts["tflite_float16"]["top1_agreement"] >= 0.99
    # The SavedModel was run in a fresh Python process without ekg_tf, fed PNG bytes.
    assert arts["saved_model"]["fresh_process_without_ekg_tf"] is True
    # Independently of the report: run the written edge artifacts against the *gated* model.
    art_dir = os.path.join(r20["export_dir"], "artifacts", "1")
    out = tflite.TFLiteRunner(os.path.join(art_dir, "model_float32.tflite")).predict(r20["x"])
    assert rel_diff(gated, out) <= FLOAT_REL_TOL
    out = OnnxRunner(os.path.join(art_dir, "model.onnx")).predict(r20["x"])
    assert rel_diff(gated, out) <= FLOAT_REL_TOL
    for name in ("export_report.json", "export_report.md"):
        assert os.path.exists(os.path.join(art_dir, name))
        assert os.path.exists(os.path.join(r20["export_dir"], name))


def test_import_and_full_export_do_not_load_tfmot(r20):
    """ekg_tf imports tfmot / tf-keras only in the QAT worker process (tfmot sets
    TF_USE_LEGACY_KERAS=1, which would switch this process's tf.keras to Keras 2): after
    `import ekg_tf`, the QAT caller side and the full r20 export, neither is loaded."""
    import sys
    import ekg_tf.export.runner, ekg_tf.pipeline.stages, ekg_tf.qat.pipeline  # noqa: F401
    assert r20["report"]["status"] == "ok"
    assert {"saved_model", "tflite_float32", "onnx"} <= set(by_name(r20["report"]))
    assert [m for m in sys.modules if m.split(".")[0] in
            ("tensorflow_model_optimization", "tf_keras")] == []
    assert "TF_USE_LEGACY_KERAS" not in os.environ


def test_r20_serving_signature_and_warmup(r20):
    path = by_name(r20["report"])["saved_model"]["path"]
    assert path.endswith(os.path.join("saved_model", "ekg_model", "1"))
    proc = subprocess.run([saved_model_cli(), "show", "--all", "--dir", path],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "signature_def['serving_default']" in out
    assert "inputs['image_bytes']" in out and "DT_STRING" in out
    for name in ("logits", "probabilities", "classes"):
        assert f"outputs['{name}']" in out
    models_config = open(os.path.join(r20["export_dir"], "models.config")).read()
    assert 'base_path: "/models/ekg/saved_model/ekg_model"' in models_config
    logs = sm.read_warmup(os.path.join(path, sm.WARMUP_FILE))
    assert len(logs) == 2  # batch of 1 and a batch of 8
    for log, n in zip(logs, (1, 8)):
        request = log.predict_log.request
        assert request.model_spec.name == "ekg_model"
        assert request.model_spec.signature_name == "serving_default"
        assert list(request.inputs) == ["image_bytes"]
        assert request.inputs["image_bytes"].tensor_shape.dim[0].size == n


def test_r20_uint8_contract_bumps_version(r20):
    """A different model into the same export dir: version 2 (auto); never overwrites 1."""
    v1 = by_name(r20["report"])["saved_model"]["path"]
    before = {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
              for d, _, fs in os.walk(v1) for f in fs}
    slim = slim_model(r20["model"], r20["spec"])
    slim.get_layer("fc").bias.assign(slim.get_layer("fc").bias.numpy() + 1.0)  # different model
    with pytest.raises(UserError, match="different model as version 1"):
        export_all(ExportRequest(slim=slim, export_dir=r20["export_dir"], **CIFAR,
                                 verify_uint8=r20["data"].x[:16], verify_labels=None,
                                 formats=("saved_model",), version=1,
                                 contract="images_uint8"), progress=lambda m: None)
    report = export_all(ExportRequest(
        slim=slim, export_dir=r20["export_dir"], **CIFAR, verify_uint8=r20["data"].x[:64],
        verify_labels=r20["data"].y[:64], formats=("saved_model",), contract="images_uint8",
        latency_runs=2), progress=lambda m: None)
    assert report["version"] == 2 and report["status"] == "ok"
    path = by_name(report)["saved_model"]["path"]
    assert path.endswith(os.path.join("ekg_model", "2"))
    entry = by_name(report)["saved_model"]
    assert entry["input"] == "images_uint8" and entry["max_rel_diff"] <= FLOAT_REL_TOL
    # Version 1 is untouched, byte for byte.
    after = {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
              for d, _, fs in os.walk(v1) for f in fs}
    assert after == before


def test_version_policy_unit(tmp_path):
    os.makedirs(tmp_path / "saved_model" / "m" / "3")
    os.makedirs(tmp_path / "artifacts" / "3")
    (tmp_path / "artifacts" / "3" / "fingerprint.txt").write_text("abc\n")
    assert resolve_version(str(tmp_path), "m", 0, "xyz") == 4
    assert resolve_version(str(tmp_path), "m", 3, "abc") == 3  # same model: may re-export
    assert resolve_version(str(tmp_path), "m", 5, "xyz") == 5
    with pytest.raises(UserError, match="refusing to overwrite"):
        resolve_version(str(tmp_path), "m", 3, "xyz")


def test_bad_export_arguments(r20, tmp_path):
    common = dict(slim=r20["slim"], export_dir=str(tmp_path), **CIFAR,
                  verify_uint8=r20["data"].x[:4], verify_labels=None)
    with pytest.raises(ValueError, match="unknown export format"):
        export_all(ExportRequest(formats=("saved_model", "tensorrt"), **common))
    with pytest.raises(ValueError, match="unknown quantization mode"):
        export_all(ExportRequest(formats=("tflite",), quant_modes=("int4",), **common))
    with pytest.raises(ValueError, match="at least one quantization mode"):
        export_all(ExportRequest(formats=("tflite",), quant_modes=(), **common))
    with pytest.raises(ValueError, match="representative dataset"):
        export_all(ExportRequest(formats=("tflite",), quant_modes=("int8",), **common))
    with pytest.raises(ValueError, match="input_contract"):
        export_all(ExportRequest(contract="jpeg", **common))
    with pytest.raises(ValueError, match="unknown int8 calibration"):
        export_all(ExportRequest(formats=("tflite",), quant_modes=("int8",),
                                 representative=r20["x"][:4], int8_calibration="kl", **common))
    assert not os.listdir(tmp_path)  # nothing written on bad input


# ------------------------------------- ResNet-56 published, searched to <= 0.45 MACs

@pytest.fixture(scope="module")
def r56(searched_resnet56, tmp_path_factory):
    from ekg_tf.weights import load_weights
    config, workdir, result = searched_resnet56
    spec = SubnetSpec.from_json(result["subnet"])
    # What ekg-export does with a search result: the search's weights, slimmed.
    slim, model = load_slim(config, spec, result["weights"])
    published = GatedModel(build_model("resnet56", 10))
    load_weights(published, RES56)
    dense = slim_model(published)
    with np.load(TEST1000) as f:
        x_raw, y = f["x"], f["y"].astype(np.int64)
    with np.load(TRAIN) as f:
        idx = np.sort(np.random.default_rng(0).choice(len(f["y"]), 2048, replace=False))
        x_train = normalize(f["x"][idx], "cifar10").numpy()
    x = normalize(x_raw, "cifar10").numpy()
    gated_logits = model(x[:200]).numpy()
    slim_logits_stale = slim(x[:200]).numpy()
    recalibrate_batch_norm(slim, x_train)  # training images only (spec section 9)
    export_dir = str(tmp_path_factory.mktemp("r56_export"))
    report = export_all(ExportRequest(
        slim=slim, export_dir=export_dir, **CIFAR, verify_uint8=x_raw, verify_labels=y,
        formats=("saved_model", "tflite", "onnx"), quant_modes=("none", "dynamic", "int8"),
        representative=x_train[:256], contract="images", latency_runs=2),
        progress=lambda m: None)
    return dict(model=model, slim=slim, dense=dense, spec=spec, x=x, y=y, x_train=x_train,
                report=report, search=result, gated_logits=gated_logits, slim_logits_stale=slim_logits_stale)


def test_r56_pruned_float_chain(r56):
    counter = ComplexityCounter(r56["model"])
    assert r56["search"]["status"] == "done"
    assert counter.macs_ratio(r56["spec"].rates) == pytest.approx(r56["search"]["macs_ratio"])
    assert 0.43 < r56["search"]["macs_ratio"] <= 0.45
    assert rel_diff(r56["gated_logits"], r56["slim_logits_stale"]) <= FLOAT_REL_TOL
    arts = by_name(r56["report"])
    for name in ("keras_folded", "saved_model", "tflite_float32", "onnx"):
        assert arts[name]["status"] == "ok"
        assert arts[name]["max_rel_diff"] <= FLOAT_REL_TOL, arts[name]
        assert arts[name]["top1_agreement"] >= 0.999, arts[name]
        assert arts[name]["images"] == 1000
    assert arts["onnx"]["opset"] == 17
    # Searched, not fine-tuned, BN re-estimated: measured 82-84% on the lossless test
    # images (the full-cost search gives 87-90%, the published dense network 93.4%).
    assert arts["keras"]["top1_accuracy"] > 0.75, arts["keras"]


def test_r56_quantized_tflite(r56, tmp_path):
    arts = by_name(r56["report"])
    assert arts["tflite_dynamic"]["top1_agreement"] >= 0.98, arts["tflite_dynamic"]
    assert arts["tflite_dynamic"]["size_bytes"] < 0.4 * arts["tflite_float32"]["size_bytes"]
    int8 = arts["tflite_int8"]
    assert int8["calibration"] == "mse"
    assert int8["size_bytes"] < 0.4 * arts["tflite_float32"]["size_bytes"]
    # The report's verdict follows the 98% tolerance, and a failure fails the export.
    assert (int8["status"] == "ok") == (int8["top1_agreement"] >= 0.98)
    if int8["status"] != "ok":
        assert r56["report"]["status"] == "failed"
    # MSE-optimal activation ranges against the converter's plain [min, max] on the same
    # calibration images: measured 0.974-0.982 vs 0.959-0.963 on this reduced-search
    # network (83% top-1); on the full-cost search 0.985-0.990 vs 0.980-0.987, and
    # 0.991-0.993 vs 0.982-0.983 after a short fine-tuning (89.5%; docs/export.md).
    # Both keep the float accuracy (within 0.7 points).
    from ekg_tf.latency.runtimes import edge_saved_model
    edge = edge_saved_model(fold_batch_norm(r56["slim"]), str(tmp_path / "edge"))
    path = str(tmp_path / "minmax_int8.tflite")
    with open(path, "wb") as f:
        f.write(tflite.convert(edge, "int8", r56["x_train"][:256], calibration="minmax"))
    ref = r56["slim"].predict(r56["x"], batch_size=250, verbose=0).argmax(1)
    minmax = float(np.mean(tflite.TFLiteRunner(path).predict(r56["x"]).argmax(1) == ref))
    assert int8["top1_agreement"] >= minmax + 0.005, (int8["top1_agreement"], minmax)
    assert int8["top1_agreement"] >= 0.97, int8
    assert abs(int8["top1_accuracy"] - arts["keras"]["top1_accuracy"]) <= 0.01, int8


def test_r56_dense_int8_agreement(r56, tmp_path):
    """Full-int8 TFLite of the published ResNet-56 agrees with Keras on >= 98% of the images."""
    from ekg_tf.latency.runtimes import edge_saved_model
    folded = fold_batch_norm(r56["dense"])
    edge = edge_saved_model(folded, str(tmp_path / "edge"))
    path = str(tmp_path / "dense_int8.tflite")
    with open(path, "wb") as f:
        f.write(tflite.convert(edge, "int8", r56["x_train"][:256], int8_io=True))
    runner = tflite.TFLiteRunner(path)
    assert runner.input_dtype == np.int8
    out = runner.predict(r56["x"])
    ref = r56["dense"].predict(r56["x"], batch_size=250, verbose=0)
    # The published network, slimmed at rate 1, keeps the reference's accuracy
    # (../shared/data/README.md: 93.40% on the lossless 1,000 with BN in inference mode).
    assert abs(float(np.mean(ref.argmax(1) == r56["y"])) - 0.934) <= 0.002
    agreement = float(np.mean(out.argmax(1) == ref.argmax(1)))
    assert agreement >= 0.98, agreement
    assert abs(float(np.mean(out.argmax(1) == r56["y"])) - 0.934) <= 0.01
