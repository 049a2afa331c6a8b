"""Writes every requested artifact of a slim model and verifies each one.

Layout under `export_dir`:
  saved_model/<model_name>/<version>/     TF Serving model (signature serving_default)
  artifacts/<version>/model.keras          slim Keras model (the verification reference)
  artifacts/<version>/model_folded.keras   BN folded into the convs (deployment graph)
  artifacts/<version>/model_<mode>.tflite  float32 / float16 / dynamic / int8
  artifacts/<version>/model.onnx
  artifacts/<version>/export_report.json + export_report.md (also copied to export_dir/)
Versions: `version=0` takes the next free number, except that an export killed
before its report was written is finished in its own version (same model) instead of
starting a new one; an explicit version that already holds a *different* model is
refused (never overwritten); the same model (same weights fingerprint) may be
re-exported into it. Temporary files a killed export left are removed first; one
export at a time writes an export directory (a lock).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

import numpy as np
import keras

from ekg_tf.errors import UserError
from ekg_tf.latency.runtimes import RUNTIMES, Runtime, edge_saved_model
from ekg_tf.slimming import fold_batch_norm
from ekg_tf.utils.io import (atomic_path, atomic_write_text, directory_lock,
                             remove_temporaries)
from ekg_tf.export import (onnx_export, options, report as report_lib, saved_model as sm,
                           tflite, verify)


@dataclasses.dataclass
class PrebuiltArtifact:
    """A TFLite file made elsewhere from the same network (e.g. by quantization-aware
    training, `ekg_tf.qat`), verified like the converted ones. `source_logits`: the
    logits on the verification images of the model it was converted from, if that is
    not the reference (reported as `source_top1_agreement` / `source_max_abs_diff`)."""
    path: str
    source_logits: np.ndarray | None = None
    source: str = ""


@dataclasses.dataclass
class ExportRequest:
    """Everything the exporter needs; images are real data (uint8) and labels."""
    slim: keras.Model                 # reference: slim Keras model with valid BN statistics
    export_dir: str
    normalization: object             # raw pixels -> model inputs (data.preprocessing.Normalization)
    verify_uint8: np.ndarray          # N real images (test split) for diffs and accuracy
    verify_labels: np.ndarray | None
    formats: tuple = options.FORMATS
    quant_modes: tuple = ("none",)
    representative: np.ndarray | None = None  # normalised float32 *training* images (int8)
    model_name: str = "ekg_model"
    version: int = 0
    contract: str = "images"
    fold_batch_norm: bool = True
    opset: int = 17
    int8_io: bool = False
    int8_calibration: str = "mse"    # activation ranges of full-int8 TFLite: mse | minmax
    latency_runs: int = 20
    threads: int = 2
    dense: keras.Model | None = None  # the unpruned slim model, for latency comparison
    prebuilt: dict = dataclasses.field(default_factory=dict)  # name -> PrebuiltArtifact (TFLite)
    info: dict = dataclasses.field(default_factory=dict)  # extra report fields (spec, MACs...)


def _dir_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _existing(export_dir: str, model_name: str) -> set[int]:
    versions = set(sm.existing_versions(os.path.join(export_dir, "saved_model", model_name)))
    versions |= set(sm.existing_versions(os.path.join(export_dir, "artifacts")))
    return versions


def _stored_fingerprint(export_dir: str, model_name: str, version: int) -> str | None:
    path = os.path.join(export_dir, "artifacts", str(version), "fingerprint.txt")
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    meta = os.path.join(export_dir, "saved_model", model_name, str(version), sm.METADATA_FILE)
    if os.path.exists(meta):
        return json.load(open(meta)).get("fingerprint")
    return None


def _complete(export_dir: str, version: int) -> bool:
    """The report is written last: without it, the export of `version` was interrupted."""
    return os.path.exists(os.path.join(export_dir, "artifacts", str(version),
                                       "export_report.json"))


def resolve_version(export_dir: str, model_name: str, version: int, fingerprint: str) -> int:
    """The version to write: for 0, the latest one if an export of this very model was
    interrupted there, else the next free one; an existing explicit one only for the
    same model."""
    existing = _existing(export_dir, model_name)
    if version < 0:
        raise UserError(f"export.version must be >= 0 (0 = next free), got {version}")
    if version == 0:
        latest = max(existing, default=0)
        if latest and not _complete(export_dir, latest) and \
                _stored_fingerprint(export_dir, model_name, latest) == fingerprint:
            return latest  # finish the interrupted export of this model
        return latest + 1
    if version in existing:
        stored = _stored_fingerprint(export_dir, model_name, version)
        if stored != fingerprint:
            raise UserError(
                f"{export_dir} already holds a different model as version {version} "
                f"(versions present: {sorted(existing)}); refusing to overwrite it. "
                "Use export.version=0 for the next free version, or another export dir.")
    return version


def export_all(req: ExportRequest, progress=print) -> dict:
    """Writes and verifies every artifact; returns the report (status 'ok' or 'failed')."""
    _check_request(req)  # bad settings write nothing, not even the lock
    with directory_lock(req.export_dir, "this export directory"):
        removed = remove_temporaries(req.export_dir)
        if removed:
            progress(f"[export] removed {len(removed)} temporary file(s) of an interrupted "
                     "export")
        return _export_all(req, progress)


def _check_request(req: ExportRequest) -> tuple[list, list]:
    """(formats, TFLite modes) of a request whose settings are all valid."""
    formats = options.check_formats(req.formats)
    modes = options.check_modes(req.quant_modes) if "tflite" in formats else []
    if "tflite" in formats and not modes:
        raise UserError(f"format tflite needs at least one quantization mode of "
                        f"{options.QUANT_MODES}")
    options.check_contract(req.contract)
    options.check_calibration(req.int8_calibration)
    if "tflite" in formats and "int8" in modes and (
            req.representative is None or len(req.representative) == 0):
        raise UserError("--quantize=int8 needs a representative dataset of training images")
    if not len(req.verify_uint8):
        raise UserError("no verification images")
    return formats, modes


class _Verification:
    """The reference logits and the artifacts checked against them so far."""

    def __init__(self, req: ExportRequest, progress):
        self.req, self.progress = req, progress
        self.x = req.normalization.numpy(req.verify_uint8)
        self.labels = req.verify_labels
        self.keras_fn = verify.keras_predictor(req.slim)
        self.reference = verify.predict_batched(self.keras_fn, self.x)
        self.artifacts = []

    def add(self, name, fmt, path, logits, latency, extra=None):
        metrics = verify.compare(self.reference, logits, self.labels)
        passed, reasons = verify.check(name, metrics)
        entry = {"name": name, "format": fmt, "path": os.path.abspath(path) if path else None,
                 "size_bytes": _dir_size(path) if path else None,
                 "status": "ok" if passed else "failed", "reasons": reasons,
                 "tolerance": verify.TOLERANCES.get(name, verify.FLOAT_TOLERANCE).to_dict(),
                 **metrics, "latency_ms": latency, **(extra or {})}
        self.artifacts.append(entry)
        self.progress(f"[export] {name}: {entry['status']} "
                      f"max_abs_diff={metrics['max_abs_diff']:.3g} "
                      f"top1_agree={metrics['top1_agreement']:.4f}"
                      + (f" {'; '.join(reasons)}" if reasons else ""))
        return entry

    def lat(self, fn):
        return {f"batch{b}": verify.latency_ms(fn, self.x[:32], b, self.req.latency_runs)
                for b in (1, 32)}


def _keras_artifacts(v: _Verification, deploy, art_dir):
    """The Keras reference (+ the folded graph, checked against it)."""
    req = v.req
    keras_path = os.path.join(art_dir, "model.keras")
    with atomic_path(keras_path) as tmp:  # tmp ends with "-model.keras"
        req.slim.save(tmp)
    v.artifacts.append({"name": "keras", "format": "keras", "path": os.path.abspath(keras_path),
                        "size_bytes": _dir_size(keras_path), "status": "ok", "reasons": [],
                        "reference": True, **verify.compare(v.reference, v.reference, v.labels),
                        "latency_ms": v.lat(v.keras_fn)})
    if req.fold_batch_norm:
        folded_path = os.path.join(art_dir, "model_folded.keras")
        with atomic_path(folded_path) as tmp:
            deploy.save(tmp)
        folded_fn = verify.keras_predictor(deploy)
        v.add("keras_folded", "keras", folded_path, verify.predict_batched(folded_fn, v.x),
              v.lat(folded_fn))


def _saved_model_artifact(v: _Verification, deploy, art_dir, version, fingerprint):
    req, progress = v.req, v.progress
    path = os.path.join(req.export_dir, "saved_model", req.model_name, str(version))
    if os.path.exists(path):  # same fingerprint (resolve_version): keep the served copy
        progress(f"[export] {path} already holds this model; kept as is")
    else:
        sm.write_saved_model(deploy, path, req.contract, req.normalization, req.model_name,
                             warmup_raw_uint8=req.verify_uint8[:8],
                             metadata={"fingerprint": fingerprint, "contract": req.contract,
                                       "model_name": req.model_name, "version": version,
                                       "fold_batch_norm": req.fold_batch_norm, **req.info})
    models_config = os.path.join(req.export_dir, "models.config")
    if not os.path.exists(models_config):  # an example for TF Serving; never clobbered
        atomic_write_text(models_config, sm.models_config(req.model_name))
    inputs = sm.contract_inputs(req.contract, req.verify_uint8, req.normalization)
    res = sm.run_in_fresh_process(path, inputs, runs=req.latency_runs, workdir=art_dir)
    extra = {"input": res["input"], "outputs": res["outputs"],
             "fresh_process_without_ekg_tf": not res["ekg_tf_imported"],
             "warmup_records": len(sm.read_warmup(os.path.join(path, sm.WARMUP_FILE)))}
    entry = v.add("saved_model", "saved_model", path, res["logits"],
                  {"batch1": res["latency"]["batch1_ms"], "batch32": res["latency"]["batch32_ms"]},
                  extra)
    consistent = (np.array_equal(res["classes"], np.argmax(res["logits"], 1))
                  and np.allclose(res["probabilities"].sum(1), 1.0, atol=1e-4))
    if not consistent or res["ekg_tf_imported"] or res["outputs"] != sorted(sm.OUTPUTS):
        entry["status"] = "failed"
        entry["reasons"].append("classes/probabilities/outputs inconsistent or the fresh "
                                "process needed ekg_tf")


def _tflite_artifacts(v: _Verification, deploy, art_dir, modes):
    req = v.req
    build = tempfile.mkdtemp(dir=art_dir, prefix=".edge-")
    try:
        edge = edge_saved_model(deploy,  # as the latency model converts
                                os.path.join(build, "edge"))
        for mode in modes:
            t0 = time.time()
            blob = tflite.convert(edge, mode, req.representative, int8_io=req.int8_io,
                                  calibration=req.int8_calibration)
            path = os.path.join(art_dir, f"model_{'float32' if mode == 'none' else mode}.tflite")
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    f.write(blob)
            runner = tflite.TFLiteRunner(path, num_threads=req.threads)
            v.add(tflite.artifact_name(mode), "tflite", path, runner.predict(v.x),
                  v.lat(runner), {"convert_seconds": time.time() - t0,
                                  "int8_io": bool(req.int8_io and mode == "int8"),
                                  **({"calibration": req.int8_calibration}
                                     if mode == "int8" else {})})
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _onnx_artifact(v: _Verification, deploy, art_dir):
    req = v.req
    path = os.path.join(art_dir, "model.onnx")
    t0 = time.time()
    proto = onnx_export.convert(deploy, path, opset=req.opset)
    runner = onnx_export.OnnxRunner(path, num_threads=req.threads)
    v.add("onnx", "onnx", path, runner.predict(v.x), v.lat(runner),
          {"opset": int(proto.opset_import[0].version), "convert_seconds": time.time() - t0})


def _export_all(req: ExportRequest, progress) -> dict:
    formats, modes = _check_request(req)
    start = time.time()
    deploy = fold_batch_norm(req.slim) if req.fold_batch_norm else req.slim
    fingerprint = sm.model_fingerprint(req.slim, f"{req.contract}|fold={req.fold_batch_norm}")
    version = resolve_version(req.export_dir, req.model_name, req.version, fingerprint)
    art_dir = os.path.join(req.export_dir, "artifacts", str(version))
    os.makedirs(art_dir, exist_ok=True)
    atomic_write_text(os.path.join(art_dir, "fingerprint.txt"), fingerprint + "\n")

    v = _Verification(req, progress)
    _keras_artifacts(v, deploy, art_dir)
    if "saved_model" in formats:
        _saved_model_artifact(v, deploy, art_dir, version, fingerprint)
    if "tflite" in formats:
        _tflite_artifacts(v, deploy, art_dir, modes)
        for name, artifact in req.prebuilt.items():
            _prebuilt_artifact(v, name, artifact, art_dir)
    if "onnx" in formats:
        _onnx_artifact(v, deploy, art_dir)

    dense = _dense_latency(req, formats, v.lat) if req.dense is not None else None
    result = {
        "status": "ok" if all(a["status"] == "ok" for a in v.artifacts) else "failed",
        "model_name": req.model_name, "version": version, "export_dir": os.path.abspath(
            req.export_dir), "contract": req.contract, "fold_batch_norm": req.fold_batch_norm,
        "fingerprint": fingerprint, "verify_images": int(len(v.x)),
        "threads": {"tflite": req.threads, "onnxruntime": req.threads,
                    "tensorflow": f"default (cpu_count={os.cpu_count()})"},
        "runtime_settings": {name: Runtime(name, req.threads).describe() for name in RUNTIMES},
        "latency_runs": req.latency_runs, "latency_statistic": "median wall ms",
        "artifacts": v.artifacts, "dense_latency_ms": dense, **req.info,
        "seconds": time.time() - start,
    }
    report_lib.write(result, art_dir, also=req.export_dir)
    return result


def _prebuilt_artifact(v: _Verification, name, artifact: PrebuiltArtifact, art_dir):
    """Copies a prebuilt TFLite file into the version's artifacts and verifies it."""
    path = os.path.join(art_dir, f"model_{name.removeprefix('tflite_')}.tflite")
    with atomic_path(path) as tmp:
        shutil.copyfile(artifact.path, tmp)
    runner = tflite.TFLiteRunner(path, num_threads=v.req.threads)
    logits = runner.predict(v.x)
    extra = {"prebuilt_from": os.path.abspath(artifact.path), "source": artifact.source}
    if artifact.source_logits is not None:
        own = verify.compare(artifact.source_logits, logits)
        extra.update(source_top1_agreement=own["top1_agreement"],
                     source_max_abs_diff=own["max_abs_diff"])
    v.add(name, "tflite", path, logits, v.lat(runner), extra)


def _dense_latency(req: ExportRequest, formats, lat) -> dict:
    """Latency of the unpruned network in the float formats, for the pruned/dense ratio."""
    dense = fold_batch_norm(req.dense) if req.fold_batch_norm else req.dense
    out = {"keras": lat(verify.keras_predictor(req.dense))}
    build = tempfile.mkdtemp(dir=req.export_dir, prefix=".dense-")
    try:
        if "tflite" in formats:
            edge = edge_saved_model(dense, os.path.join(build, "edge"))
            path = os.path.join(build, "dense.tflite")
            with open(path, "wb") as f:
                f.write(tflite.convert(edge, "none"))
            out["tflite_float32"] = lat(tflite.TFLiteRunner(path, num_threads=req.threads))
        if "onnx" in formats:
            path = os.path.join(build, "dense.onnx")
            onnx_export.convert(dense, path, opset=req.opset)
            out["onnx"] = lat(onnx_export.OnnxRunner(path, num_threads=req.threads))
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return out
