"""The `ekg-export` job: the pruned network of a workdir as verified deployment artifacts.

`run_export(config, workdir, ...)` reads the sub-network (`workdir/search/subnet.json`)
and the weights (default: the fine-tuned model in `workdir/finetune/`, else the
search's adapted weights, else `config.model.init`), re-estimates BN statistics on
training images when the weights are not fine-tuned (spec section 9), and writes and
verifies every artifact with `exporter.export_all` under `workdir/export/`; returns the
export report. The steps below read like the job: check the inputs, load the slim
model, gather the images, build the request, export, write the summaries.
"""
from __future__ import annotations

import os
import sys

from ekg_tf.export.options import check_inputs
from ekg_tf.export.weights_io import find_weights, load_slim, sample_indices


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def load_model(config, workdir, spec, weights_flag, log):
    """(slim model with valid BN statistics, gated clone or None, weights path, fine-tuned)."""
    weights, fine_tuned = find_weights(workdir, weights_flag, config.model.init)
    log(f"[export] weights {weights} (fine-tuned: {fine_tuned})")
    slim, gated = load_slim(config, spec, weights)
    # A slim model's weights (.keras / slim .weights.h5) come after slimming, with
    # statistics of their own: only gated weights from outside finetune/ need re-estimation.
    return slim, gated, weights, fine_tuned or gated is None


def recalibrate(config, slim, train, log):
    """Spec section 9: stored statistics do not fit the slim network; re-estimate them on
    *training* images (never evaluation data)."""
    from ekg_tf.data import normalize
    from ekg_tf.slimming import recalibrate_batch_norm
    norm_name = config.data.get("normalization") or config.data.name
    idx = sample_indices(len(train), config.search.bn_recalibration_images, config.seed)
    info = recalibrate_batch_norm(slim, normalize(train.x[idx], norm_name).numpy())
    log(f"[export] BN statistics re-estimated on {info['images']} training images")


def representative_images(config, rep_path, train):
    """Normalised training images calibrating full-int8 TFLite."""
    from ekg_tf.data import normalize
    if rep_path:
        from ekg_tf.data.sources import load_npz
        rep = load_npz(rep_path).x
    else:
        rep = train.x
    rep = rep[sample_indices(len(rep), config.export.representative_images, config.seed + 1)]
    return normalize(rep, config.data.get("normalization") or config.data.name).numpy()


def dense_reference(config, spec, gated):
    """The unpruned network (latency comparison only): a fine-tuned slim model has no
    gated weights, so the architecture at full width is timed."""
    from ekg_tf.cli import common
    from ekg_tf.slimming import slim_model
    base = gated if gated is not None else common.build_model_from_config(
        config, load_init=False, gated=True)
    dense = None
    if config.export.dense_latency:
        dense = slim_model(base, spec.full_width(), name=f"{base.arch_name}_dense")
    return base, dense


def predicted_latency(config, base, spec) -> dict:
    """The latency model's prediction of the pruned and the dense network on each runtime,
    from the block tables already cached (`ekg_tf.latency`; nothing is timed here): the
    report shows it beside the measured latency."""
    from ekg_tf.latency.model import cached_predictions
    return cached_predictions(base, spec, int(config.export.threads),
                              cache_dir=str(config.search.get("latency_cache", "")))


def qat_artifact(workdir: str, slim, log) -> dict:
    """{"tflite_int8_qat": the ekg-qat TFLite of workdir/qat/} when it was trained from
    exactly these float weights (else nothing: a stale file is left out, with a note)."""
    import json
    from ekg_tf.export import exporter
    from ekg_tf.qat.job import FILES
    from ekg_tf.qat.pipeline import ARTIFACT, float_fingerprint
    path = os.path.join(workdir, "qat", FILES["result"])
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        result = json.load(f)
    if result.get("float_fingerprint") != float_fingerprint(slim):
        log(f"[export] {result.get('tflite')} was trained from other float weights: left out "
            "(re-run ekg-qat)")
        return {}
    return {ARTIFACT: exporter.PrebuiltArtifact(
        result["tflite"], source="ekg-qat: the QAT tf-keras model (fake-quantized)")}


def run_export(config, workdir: str, formats=None, quantize=None, weights=None, subnet=None,
               export_dir=None, representative_data=None, log=None) -> dict:
    """Writes and verifies the deployment artifacts of `workdir`; returns the export report
    (`report["status"]` is "ok" when every artifact passes its tolerance)."""
    from ekg_tf.config import resolve
    from ekg_tf.data import load_arrays, normalization_for
    from ekg_tf.export import exporter
    from ekg_tf.flops import ComplexityCounter
    from ekg_tf.subnet import SubnetSpec
    log = log or _log
    config = resolve(config)
    ecfg = config.export
    inputs = check_inputs(config, workdir, formats, quantize, subnet, export_dir,
                          representative_data)
    spec = SubnetSpec.from_json(inputs.subnet_path)
    log(f"[export] sub-network {inputs.subnet_path}")
    slim, gated, weights_path, fine_tuned = load_model(config, workdir, spec, weights, log)
    need_train = not fine_tuned or ("int8" in inputs.modes and not inputs.representative_path)
    train = load_arrays(config.data, "train") if need_train else None
    if not fine_tuned:
        recalibrate(config, slim, train, log)
    representative = (representative_images(config, inputs.representative_path, train)
                      if "int8" in inputs.modes else None)
    test = load_arrays(config.data, "test")
    n_verify = min(int(ecfg.verify_images), len(test))
    base, dense = dense_reference(config, spec, gated)
    counter = ComplexityCounter(base.dependency, round_to=spec.round_to)
    full, pruned = counter.full, counter.count(spec.rates)
    predicted = predicted_latency(config, base, spec)
    norm_name = config.data.get("normalization") or config.data.name
    req = exporter.ExportRequest(
        slim=slim, export_dir=inputs.export_dir, normalization=normalization_for(norm_name),
        verify_uint8=test.x[:n_verify], verify_labels=test.y[:n_verify],
        formats=tuple(inputs.formats), quant_modes=tuple(inputs.modes),
        representative=representative, model_name=ecfg.model_name, version=int(ecfg.version),
        contract=ecfg.input_contract, fold_batch_norm=bool(ecfg.fold_batch_norm),
        opset=int(ecfg.opset), int8_io=bool(ecfg.int8_io),
        int8_calibration=str(ecfg.int8_calibration), latency_runs=int(ecfg.latency_runs),
        threads=int(ecfg.threads), dense=dense,
        prebuilt=qat_artifact(workdir, slim, log) if "tflite" in inputs.formats else {},
        info={"arch": spec.arch, "subnet": os.path.abspath(inputs.subnet_path),
              "weights": os.path.abspath(weights_path), "fine_tuned": fine_tuned,
              "bn_recalibrated": not fine_tuned, "macs": pruned.macs, "dense_macs": full.macs,
              "params": pruned.params, "dense_params": full.params,
              "macs_ratio": pruned.macs / full.macs, "params_ratio": pruned.params / full.params,
              "round_to": sorted(set(spec.round_to.values())),
              "predicted_latency_ms": predicted})
    report = exporter.export_all(req, progress=log)
    write_summaries(report, os.path.join(report["export_dir"], "artifacts",
                                         str(report["version"])))
    return report


def summary(report: dict) -> dict:
    """The CLI's JSON line: per-artifact status, size, differences and latency."""
    return {
        "status": report["status"], "version": report["version"],
        "export_dir": report["export_dir"], "macs_ratio": report["macs_ratio"],
        "dense_latency_ms": report.get("dense_latency_ms"),
        "artifacts": {a["name"]: {"status": a["status"], "size_bytes": a["size_bytes"],
                                  "max_abs_diff": a["max_abs_diff"],
                                  "top1_agreement": a["top1_agreement"],
                                  "top1_accuracy": a.get("top1_accuracy"),
                                  "latency_ms": a["latency_ms"]}
                      for a in report["artifacts"]}}


def write_summaries(report: dict, directory: str):
    """TensorBoard text/scalars and a PNG latency bar plot of the report."""
    import tensorflow as tf
    from ekg_tf.export.report import markdown
    from ekg_tf.utils.plots import save_bar_plot
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
