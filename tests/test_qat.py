"""Prune, then quantize (ekg_tf.qat): tf-keras conversion parity, quantization-aware training
to a verified full-int8 TFLite, isolation of tfmot/tf-keras from Keras 3, bad inputs.

Tolerances: the tf-keras model converted from a Keras 3 network computes its function
up to float32 rounding: max |logits - Keras 3 logits| <= 1e-5 * max |Keras 3 logits|
in inference mode (measured 2e-7) and <= 5e-5 with BN batch statistics (training mode,
the regime QAT trains in; measured 5e-6: tf-keras uses the fused BN kernel); the weights
are copied bit for bit. After that training-mode call the BN moving statistics agree to
2e-4 relative (measured 9e-5: tf-keras' fused BN moves the variance with the unbiased
batch variance, n/(n-1) with n = 16 images x 8 x 8 positions, weighted by 1 - momentum). The QAT int8 TFLite file is
checked against the QAT tf-keras model it was converted from (top-1 agreement >= 90% on
random-weight networks and random images, where logit margins are small) and against
the float network by the export report (>= 98%, as post-training int8).
The real-network evidence (published ResNet-56 searched to 0.45 and fine-tuned) is
benchmarks/qat.py's table.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, TESTS_DIR

CONVERSION_REL_TOL = 1e-5
TRAINING_REL_TOL = 5e-5
BN_UPDATE_REL_TOL = 2e-4
TFMOT_MODULES = ("tensorflow_model_optimization", "tf_keras")


def env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, TESTS_DIR]),
                TF_CPP_MIN_LOG_LEVEL="2")


def run_script(code_or_path, *args, timeout=600):
    cmd = [sys.executable, code_or_path, *args] if code_or_path.endswith(".py") else [
        sys.executable, "-c", code_or_path, *args]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                         env=env())
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def loaded_tfmot_modules():
    return sorted(m for m in sys.modules if m.split(".")[0] in TFMOT_MODULES)


# ----------------------------------------------------------------------------- conversion
@pytest.fixture(scope="module")
def parity_result():
    """tests/qat_parity.py's measurements (one tf-keras process for the conversion and
    the range tests)."""
    return run_script(os.path.join(TESTS_DIR, "qat_parity.py"))


def test_tf_keras_conversion_equals_keras3_network(parity_result):
    """ResNet-8 and a depthwise/separable/SE network, both slimmed at random rates, and
    Keras operations (x + y, relu): converted to tf-keras, the same logits."""
    result = parity_result
    for name in ("resnet8", "depthwise", "ops"):
        r = result[name]
        assert r["inference"] <= CONVERSION_REL_TOL, (name, r)
        assert r["training"] <= TRAINING_REL_TOL, (name, r)
        assert r["weights_equal"], name
        assert r["updated_weights"] <= BN_UPDATE_REL_TOL, (name, r)
    assert result["resnet8"]["layers"] >= 30  # stem, 3 blocks, 2 projection shortcuts, head
    assert "'double'" in result["unsupported"] and "Lambda" in result["unsupported"]


def test_mse_ranges_are_calibrated_and_stay_fixed_in_training(parity_result):
    """qat.range_calibration=mse on ResNet-8's QAT model: every activation range set,
    holding 0, some clipped below the mean batch maximum; `fixed_activation_ranges` keeps
    them through a training-mode call (the straight-through gradient still reaches the
    kernels), which without it moves them (tfmot's moving average)."""
    r = parity_result["ranges"]
    assert r["count"] >= 10 and r["names"] == 2 * r["count"], r
    assert r["hold_zero"] and r["narrower"] >= 1, r
    assert r["fixed_max_change"] == 0.0 and r["moving_max_change"] > 0.0, r
    assert r["fixed_grad"] > 0.0, r


# ----------------------------------------------------------------------------- QAT end to end
@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """QAT of the depthwise network with the EKG loss from a real memory bank (the writer
    of the search: two teachers, the full network and a sub-network), 3 steps."""
    import qat_models
    from ekg_tf.qat import quantize_aware
    from ekg_tf.subnet import SubnetSpec
    from ekg_tf.subnet_search.memory_bank import build_memory_bank
    slim, gated = qat_models.depthwise_slim()
    rng = np.random.default_rng(3)
    x, y = qat_models.images(192, seed=4), rng.integers(0, 10, 192)
    vx, vy = qat_models.images(64, seed=5), rng.integers(0, 10, 64)
    spec = SubnetSpec.from_model(gated)
    teachers = [{"step": s, "loss": 1.0 + s, "rates": {n: (1.0 if s == 0 else g.rate)
                                                       for n, g in spec.groups.items()},
                 "ranks": {n: list(g.rank) for n, g in spec.groups.items()}} for s in (0, 1)]
    workdir = tmp_path_factory.mktemp("qat")
    bank = str(workdir / "memory_bank")
    build_memory_bank(gated, teachers, [(x[i:i + 64], y[i:i + 64], np.arange(i, i + 64))
                                        for i in range(0, 192, 64)], 192, bank)
    before = slim.get_weights()
    result = quantize_aware(slim, (x, y), (vx, vy), str(workdir), steps=3, batch_size=32,
                            learning_rate=1e-4, memory_bank=bank, latency_runs=1,
                            calibration_batches=2, int8_calibration="minmax")
    return dict(result=result, slim=slim, before=before, vx=vx, workdir=workdir)


def test_qat_int8_tflite_is_verified_beside_post_training_int8(qat_run):
    result = qat_run["result"]
    arts = {a["name"]: a for a in result.report["artifacts"]}
    assert result.report["status"] == "ok", result.report
    assert {"keras", "tflite_float32", "tflite_int8", "tflite_int8_qat"} <= set(arts)
    qat = arts["tflite_int8_qat"]
    assert qat["status"] == "ok" and qat["format"] == "tflite"
    assert os.path.exists(qat["path"]) and qat["path"] == result.tflite_path
    # The same int8 weights as post-training int8 (this tiny network's file is mostly
    # flatbuffer structure; the ResNet-56 sizes are benchmarks/qat.py's).
    assert abs(qat["size_bytes"] - arts["tflite_int8"]["size_bytes"]) < 0.25 * qat["size_bytes"]
    assert qat["latency_ms"]["batch1"] > 0 and qat["latency_ms"]["batch32"] > 0
    assert qat["top1_agreement"] >= 0.98 and "top1_accuracy" in qat
    assert qat["source_top1_agreement"] >= 0.9  # vs the fake-quantized tf-keras model
    # Full integer: every op between the input QUANTIZE and the output DEQUANTIZE is int8.
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    interpreter = Interpreter(
        model_path=qat["path"],
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    assert ops[0]["op_name"] == "QUANTIZE" and ops[-1]["op_name"] == "DEQUANTIZE"
    for op in ops[1:-1]:
        assert tensors[op["outputs"][0]]["dtype"] == np.int8, op
    kinds = {op["op_name"] for op in ops}
    assert {"DEPTHWISE_CONV_2D", "CONV_2D", "MUL", "CONCATENATION", "ADD"} <= kinds


def test_qat_trains_with_the_memory_bank_and_keeps_the_caller_clean(qat_run):
    out = qat_run["result"].result
    assert out["mode"] == "ekg" and out["teachers"] == 2 and out["views"] == 2
    assert out["steps"] == 3 and out["status"] == "done"
    assert out["conversion_max_rel_diff"] <= CONVERSION_REL_TOL
    assert out["history"] and 0.0 <= out["history"][-1]["top1"] <= 1.0
    assert out["quantized_layers"] >= 10
    assert out["calibrated_ranges"] >= 10 and out["calibration_batches"] == 2
    assert out["range_calibration"] == "mse"  # the default
    # qat.freeze_bn: the 4 BNs kept the float network's moving statistics through training.
    assert out["frozen_batch_norms"] == 4 and out["frozen_statistics_max_change"] == 0.0
    # The caller's model is untouched and this process never loaded tfmot or tf-keras.
    for a, b in zip(qat_run["before"], qat_run["slim"].get_weights()):
        np.testing.assert_array_equal(a, b)
    assert loaded_tfmot_modules() == []
    assert "TF_USE_LEGACY_KERAS" not in os.environ


# ----------------------------------------------------------------------------- isolation
# `import ekg_tf` and a full export (SavedModel, TFLite, ONNX) never load tfmot or tf-keras:
# test_export.py::test_import_and_full_export_do_not_load_tfmot (after its full export,
# in that process; this file's tests load them only in subprocesses, and check it above).


# ----------------------------------------------------------------------------- bad inputs
def _config(**qat):
    from ekg_tf.config import reference_cifar_config
    config = reference_cifar_config("resnet8", "cifar10")
    config.qat.update(qat)
    return config


@pytest.mark.parametrize("qat,message", [
    ({}, "no search result at"),
    ({"epochs": 0}, "qat.epochs is 0"),
    ({"mode": "int4"}, "unknown qat.mode 'int4'"),
    ({"range_calibration": "percentile"}, "unknown qat.range_calibration 'percentile'"),
    ({"temperature": -1.0}, "qat.temperature must be >= 0"),
    ({"mode": "ekg"}, "needs the memory bank"),
])
def test_bad_qat_inputs_are_clear_errors(tmp_path, qat, message):
    from ekg_tf.qat.pipeline import run_qat
    from ekg_tf.errors import UserError
    with pytest.raises(UserError, match=message):
        run_qat(_config(**qat), str(tmp_path), log=lambda msg: None)


def test_ekg_prune_qat_stage_is_optional_and_runs_run_qat(tmp_path):
    from ekg_tf.errors import UserError
    from ekg_tf.pipeline.runner import parse_stages, run_pipeline
    config = _config(epochs=0)
    assert "qat" not in parse_stages(None, config)  # only when named
    assert parse_stages("export,qat,finetune", config) == ["finetune", "qat", "export"]
    with pytest.raises(UserError, match="qat.epochs is 0"):
        run_pipeline(config, str(tmp_path), stages="qat", log=lambda msg: None)


def test_quantize_aware_refuses_zero_epochs(tmp_path):
    import qat_models
    from ekg_tf.errors import UserError
    from ekg_tf.qat import quantize_aware
    x = qat_models.images(8)
    with pytest.raises(UserError, match="epochs is 0"):
        quantize_aware(qat_models.depthwise_model(), (x, np.zeros(8)), (x, np.zeros(8)),
                       str(tmp_path), epochs=0)


def test_ekg_qat_cli_without_search_says_what_to_run(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ekg_tf.cli.qat",
                          "--config=configs/cifar10_resnet56.py", f"--workdir={tmp_path}"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env())
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: no search result at" in out.stderr and "run ekg-search first" in out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["status"] == "error"
