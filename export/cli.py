"""ekg-export: the pruned model as SavedModel (TF Serving), TFLite and ONNX, every artifact verified.

    ekg-export --config=configs/cifar10_resnet56.py --workdir=runs/r56 \
        --formats=saved_model,tflite,onnx --quantize=none,float16,dynamic,int8

Reads the sub-network `workdir/search/subnet.json` (or --subnet) and the weights
(--weights; default: the fine-tuned model in `workdir/finetune/` if present, else
the search's `workdir/search/weights.weights.h5`, else `config.model.init`). Weights that are not fine-tuned get their BN
statistics re-estimated on training images first (spec section 9). Writes under
`workdir/export/` (or --export_dir), prints one JSON line with per-artifact
status, size, diff and latency, and exits 1 when an artifact fails its tolerance.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from ekg_tf.cli import common  # noqa: E402
from export.weights_io import find_weights, load_slim, sample_indices  # noqa: E402

FLAGS = common.define_flags()
flags.DEFINE_string("formats", "saved_model,tflite,onnx",
                    "Comma-separated formats: saved_model, tflite, onnx.")
flags.DEFINE_string("quantize", "none,float16,dynamic,int8",
                    "Comma-separated TFLite modes: none (float32), float16, dynamic, int8.")
flags.DEFINE_string("weights", None, "Weights to export (.npz/.pkl/.weights.h5/checkpoint of the "
                    "gated model, or a fine-tuned slim .keras / .weights.h5). Default: "
                    "workdir/finetune/best.keras (or last.keras) if present, else "
                    "workdir/search/weights.weights.h5, else config.model.init.")
flags.DEFINE_string("subnet", None, "Sub-network spec (default workdir/search/subnet.json).")
flags.DEFINE_string("export_dir", None, "Output directory (default workdir/export).")
flags.DEFINE_string("representative_data", None, "An .npz with uint8 'x' training images for "
                    "int8 calibration (default: export.representative_path or the training split).")

def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def main(argv):
    config, workdir = common.setup(argv)
    from ekg_tf.data import load_arrays, normalization_for, normalize
    from ekg_tf.flops import ComplexityCounter
    from ekg_tf.slimming import recalibrate_batch_norm, slim_model
    from ekg_tf.subnet import SubnetSpec
    from export import exporter, int8_calibration, saved_model as sm, tflite

    ecfg = config.export
    # Validate every cheap input before any heavy work.
    formats = exporter.check_formats(FLAGS.formats.split(","))
    modes = tflite.check_modes(FLAGS.quantize.split(",")) if "tflite" in formats else []
    sm.check_contract(ecfg.input_contract)
    int8_calibration.check_calibration(ecfg.int8_calibration)
    subnet_path = FLAGS.subnet or os.path.join(workdir, "search", "subnet.json")
    if not os.path.exists(subnet_path):
        raise FileNotFoundError(f"no search result at {subnet_path}: run ekg-search first "
                                "(or pass --subnet=path/to/subnet.json)")
    spec = SubnetSpec.from_json(subnet_path)
    rep_path = FLAGS.representative_data or ecfg.representative_path
    if rep_path and not os.path.exists(rep_path):
        raise FileNotFoundError(f"representative dataset {rep_path!r} does not exist "
                                "(an .npz with uint8 training images 'x')")
    weights, fine_tuned = find_weights(workdir, FLAGS.weights, config.model.init)
    export_dir = FLAGS.export_dir or os.path.join(workdir, "export")

    _log(f"[export] sub-network {subnet_path}, weights {weights} (fine-tuned: {fine_tuned})")
    slim, gated = load_slim(config, spec, weights)
    # A slim model's weights (.keras / slim .weights.h5) come after slimming, with
    # statistics of their own: only gated weights from outside finetune/ need re-estimation.
    fine_tuned = fine_tuned or gated is None
    norm_name = config.data.get("normalization") or config.data.name
    normalization = normalization_for(norm_name)
    need_train = not fine_tuned or ("int8" in modes and not rep_path)
    train = load_arrays(config.data, "train") if need_train else None
    if not fine_tuned:
        # Spec section 9: stored statistics do not fit the slim network; re-estimate
        # them on *training* images (never evaluation data).
        idx = sample_indices(len(train), config.search.bn_recalibration_images, config.seed)
        info = recalibrate_batch_norm(slim, normalize(train.x[idx], norm_name).numpy())
        _log(f"[export] BN statistics re-estimated on {info['images']} training images")
    representative = None
    if "int8" in modes:
        if rep_path:
            from ekg_tf.data.sources import load_npz
            rep = load_npz(rep_path).x
        else:
            rep = train.x
        rep = rep[sample_indices(len(rep), ecfg.representative_images, config.seed + 1)]
        representative = normalize(rep, norm_name).numpy()
    test = load_arrays(config.data, "test")
    n_verify = min(int(ecfg.verify_images), len(test))
    # The unpruned network only serves the latency comparison, so a fine-tuned slim
    # model (no gated weights) is timed against the architecture at full width.
    base = gated if gated is not None else common.build_model_from_config(
        config, load_init=False, gated=True)
    dense = None
    if ecfg.dense_latency:
        dense = slim_model(base, spec.full_width(), name=f"{base.arch_name}_dense")
    counter = ComplexityCounter(base.dependency)
    full, pruned = counter.full, counter.count(spec.rates)
    req = exporter.ExportRequest(
        slim=slim, export_dir=export_dir, normalization=normalization,
        verify_uint8=test.x[:n_verify], verify_labels=test.y[:n_verify], formats=tuple(formats),
        quant_modes=tuple(modes), representative=representative, model_name=ecfg.model_name,
        version=int(ecfg.version), contract=ecfg.input_contract,
        fold_batch_norm=bool(ecfg.fold_batch_norm), opset=int(ecfg.opset),
        int8_io=bool(ecfg.int8_io), int8_calibration=str(ecfg.int8_calibration),
        latency_runs=int(ecfg.latency_runs),
        threads=int(ecfg.threads), dense=dense,
        prebuilt=_qat_artifact(workdir, slim) if "tflite" in formats else {},
        info={"arch": spec.arch, "subnet": os.path.abspath(subnet_path),
              "weights": os.path.abspath(weights), "fine_tuned": fine_tuned,
              "bn_recalibrated": not fine_tuned, "macs": pruned.macs, "dense_macs": full.macs,
              "macs_ratio": pruned.macs / full.macs, "params_ratio": pruned.params / full.params})
    report = exporter.export_all(req, progress=_log)
    _write_summaries(report, os.path.join(report["export_dir"], "artifacts",
                                          str(report["version"])))
    common.print_result({
        "status": report["status"], "version": report["version"],
        "export_dir": report["export_dir"], "macs_ratio": report["macs_ratio"],
        "dense_latency_ms": report.get("dense_latency_ms"),
        "artifacts": {a["name"]: {"status": a["status"], "size_bytes": a["size_bytes"],
                                  "max_abs_diff": a["max_abs_diff"],
                                  "top1_agreement": a["top1_agreement"],
                                  "top1_accuracy": a.get("top1_accuracy"),
                                  "latency_ms": a["latency_ms"]}
                      for a in report["artifacts"]}})
    if report["status"] != "ok":
        sys.exit(1)


def _qat_artifact(workdir: str, slim) -> dict:
    """{"tflite_int8_qat": the ekg-qat TFLite of workdir/qat/} when it was trained from
    exactly these float weights (else nothing: a stale file is left out, with a note)."""
    import json
    from ekg_tf.qat.job import FILES
    from ekg_tf.qat.pipeline import ARTIFACT, float_fingerprint
    from export import exporter
    path = os.path.join(workdir, "qat", FILES["result"])
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        result = json.load(f)
    if result.get("float_fingerprint") != float_fingerprint(slim):
        _log(f"[export] {result.get('tflite')} was trained from other float weights: left out "
             "(re-run ekg-qat)")
        return {}
    return {ARTIFACT: exporter.PrebuiltArtifact(
        result["tflite"], source="ekg-qat: the QAT tf-keras model (fake-quantized)")}


def _write_summaries(report: dict, directory: str):
    """TensorBoard text/scalars and a PNG latency bar plot of the report."""
    import tensorflow as tf
    from ekg_tf.utils.plots import save_bar_plot
    from export.report import markdown
    arts = [a for a in report["artifacts"] if a.get("latency_ms")]
    save_bar_plot(os.path.join(directory, "latency.png"), [a["name"] for a in arts],
                  {f"batch {b}": [a["latency_ms"][f"batch{b}"] for a in arts] for b in (1, 32)},
                  ylabel="median latency (ms)", title=f"{report['model_name']} "
                  f"v{report['version']} (MACs ratio {report['macs_ratio']:.3f})")
    writer = tf.summary.create_file_writer(os.path.join(directory, "tb"))
    with writer.as_default():
        tf.summary.text("export_report", markdown(report), step=report["version"])
        for a in report["artifacts"]:
            tf.summary.scalar(f"{a['name']}/max_abs_diff", a["max_abs_diff"], step=report["version"])
            tf.summary.scalar(f"{a['name']}/top1_agreement", a["top1_agreement"],
                              step=report["version"])
    writer.flush()


def run():
    common.run_app(main)


if __name__ == "__main__":
    run()
