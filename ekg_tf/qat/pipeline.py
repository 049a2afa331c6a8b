"""Prune, then quantize: quantization-aware training of a pruned network (the caller's side).

`run_qat(config, workdir)` (the `ekg-qat` job) and `quantize_aware(model, ...)` (the
Python API) both:
1. take the float network: the fine-tuned slim model of `workdir/finetune/` (else the
   search's weights slimmed with re-estimated BN statistics, as `ekg-export` does), or
   the Keras model given;
2. run the QAT worker (`ekg_tf.qat.worker`) in a fresh Python process: tf-keras
   conversion, tfmot's quantization-aware model, N epochs of fine-tuning with the
   project's input pipeline and, when a memory bank exists, the EKG distillation loss,
   full-int8 TFLite conversion. tfmot and tf-keras are imported there only, so Keras 3
   stays intact here (`TF_USE_LEGACY_KERAS` is never set in this process);
3. verify the QAT TFLite file like every other artifact: an export report (`export/`'s
   exporter) holding the float Keras reference, the post-training int8 TFLite and the
   QAT file (`tflite_int8_qat`: size, agreement with the float network, accuracy,
   latency, and agreement with the QAT Keras model it was converted from).

Outputs in `workdir/qat/`: `float.keras`, `model_int8_qat.tflite`, `result.json`,
`checkpoints/` (re-running resumes), `tensorboard/`, `export/` (the report).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np

from ekg_tf.qat.job import QATJob
from ekg_tf.errors import UserError
from ekg_tf.utils.io import atomic_path, atomic_write_json

MODES = ("auto", "ekg", "float", "plain")
RANGE_CALIBRATIONS = ("mse", "minmax")  # ekg_tf.qat.quantize.RANGE_METHODS (no tfmot here)
ARTIFACT = "tflite_int8_qat"


# ----------------------------------------------------------------------------- checks
def check_settings(config) -> None:
    """Fails fast, in one line, on QAT settings that cannot run."""
    q = config.qat
    if q.mode not in MODES:
        raise UserError(f"unknown qat.mode {q.mode!r}; choose one of {MODES}")
    if int(q.epochs) < 0 or int(q.steps) < 0:
        raise UserError(f"qat.epochs and qat.steps must be >= 0, got {q.epochs} and {q.steps}")
    if int(q.epochs) < 1 and int(q.steps) < 1:
        raise UserError("qat.epochs is 0: quantization-aware training needs at least one "
                        "epoch (set qat.epochs >= 1, or qat.steps >= 1)")
    if q.get("range_calibration", "mse") not in RANGE_CALIBRATIONS:
        raise UserError(f"unknown qat.range_calibration {q.range_calibration!r}; choose one "
                        f"of {RANGE_CALIBRATIONS}")
    if not float(q.learning_rate) > 0:
        raise UserError(f"qat.learning_rate must be > 0, got {q.learning_rate}")
    if float(q.get("temperature", 0.0)) < 0:
        raise UserError(f"qat.temperature must be >= 0 (0 = finetune.temperature), got "
                        f"{q.temperature}")


# import name -> pip name of what the worker needs (requirements-qat.txt, ekg_tf[qat])
QAT_PACKAGES = {"tensorflow_model_optimization": "tensorflow-model-optimization",
                "tf_keras": "tf-keras"}


def check_packages() -> None:
    """tfmot and tf-keras are installed (looked up, not imported: they must not load here)."""
    import importlib.util
    missing = [pip for module, pip in QAT_PACKAGES.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"quantization-aware training needs {' and '.join(missing)}: "
                        "pip install 'ekg_tf[qat]' (or -r requirements-qat.txt)")


def resolve_mode(mode: str, bank_dir: str | None) -> str:
    """`auto`: the EKG distillation loss when the memory bank exists, else cross-entropy."""
    has_bank = bool(bank_dir) and os.path.exists(os.path.join(bank_dir, "meta.json"))
    if mode == "auto":
        return "ekg" if has_bank else "plain"
    if mode == "ekg" and not has_bank:
        raise UserError(f"qat.mode=ekg needs the memory bank {bank_dir}/ (meta.json missing): "
                        "run ekg-search with search.build_memory_bank=True, or use "
                        "--config.qat.mode=plain")
    return mode


# ----------------------------------------------------------------------------- the worker
def worker_environment() -> dict:
    """The worker's environment: this ekg_tf importable, no inherited legacy-Keras switch
    (the worker sets its own)."""
    import ekg_tf
    env = dict(os.environ)
    env.pop("TF_USE_LEGACY_KERAS", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(ekg_tf.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_worker(job: QATJob, stream=None) -> dict:
    """Runs the QAT worker on `job` in a fresh process (its progress goes to `stream`,
    default stderr); returns its result. A bad input in the worker is a `UserError`."""
    import json
    stream = stream or sys.stderr
    os.makedirs(job.out_dir, exist_ok=True)
    job_path = os.path.join(job.out_dir, "job.json")
    job.write(job_path)
    proc = subprocess.Popen([sys.executable, "-m", "ekg_tf.qat.worker", job_path],
                            env=worker_environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    tail = b""
    while True:
        chunk = proc.stderr.read1(4096)
        if not chunk:
            break
        stream.write(chunk.decode(errors="replace"))
        stream.flush()
        tail = (tail + chunk)[-16384:]
    code = proc.wait()
    text = tail.decode(errors="replace")
    if code == 2:
        errors = [line for line in text.splitlines() if line.startswith("error: ")]
        raise UserError(errors[-1][len("error: "):] if errors else text[-2000:])
    if code != 0:
        raise RuntimeError(f"the QAT worker failed (exit status {code}); its output ends:\n"
                           f"{text[-4000:]}")
    with open(job.path("result")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- verification
def verify(float_model, job: QATJob, result: dict, export_dir: str, normalization, images,
           labels, representative, export_cfg, info: dict, log) -> dict:
    """The export report of the float network's TFLite artifacts with the QAT file beside
    the post-training int8 one (`export/`'s exporter; all verified the same way)."""
    from ekg_tf.export.exporter import ExportRequest, PrebuiltArtifact, export_all
    qat_logits = np.load(job.path("qat_logits")) if os.path.exists(job.path("qat_logits")) \
        else None
    request = ExportRequest(
        slim=float_model, export_dir=export_dir, normalization=normalization,
        verify_uint8=images, verify_labels=labels, formats=("tflite",),
        quant_modes=("none", "int8"), representative=representative,
        model_name=str(export_cfg.model_name), contract="images",
        fold_batch_norm=bool(export_cfg.fold_batch_norm),
        int8_calibration=str(export_cfg.int8_calibration),
        latency_runs=int(export_cfg.latency_runs), threads=int(export_cfg.threads),
        prebuilt={ARTIFACT: PrebuiltArtifact(job.path("tflite"), source_logits=qat_logits,
                                             source="QAT tf-keras model (fake-quantized)")},
        info={"qat": {k: v for k, v in result.items() if k != "history"}, **info})
    return export_all(request, progress=log)


def float_fingerprint(model) -> str:
    from ekg_tf.export.saved_model import model_fingerprint
    return model_fingerprint(model, "qat-float")


def _check_resume(job: QATJob) -> None:
    """A QAT directory with checkpoints of other float weights is never resumed from."""
    path = os.path.join(job.out_dir, "job.json")
    has_checkpoints = os.path.exists(os.path.join(job.out_dir, "checkpoints", "checkpoint"))
    if has_checkpoints and os.path.exists(path):
        previous = QATJob.read(path)
        if previous.float_fingerprint != job.float_fingerprint:
            raise UserError(f"{job.out_dir} holds a QAT run of other float weights; remove it "
                            "(or use another workdir) to quantize these")


def _save_float(model, job: QATJob) -> None:
    with atomic_path(job.path("float_model")) as tmp:
        model.save(tmp)


def summary(report: dict, result: dict) -> dict:
    """The key numbers of a QAT run and its report (the CLI's JSON line)."""
    arts = {a["name"]: a for a in report["artifacts"]}
    keep = ("status", "size_bytes", "top1_agreement", "top1_accuracy", "max_abs_diff",
            "latency_ms")
    out = {"status": report["status"], "report": os.path.join(
        report["export_dir"], "artifacts", str(report["version"]), "export_report.json"),
        "tflite": result["tflite"], "mode": result["mode"], "steps": result["steps"],
        "epochs": result["epochs"], "qat_keras_top1": result["qat_keras_top1"],
        "conversion_max_rel_diff": result["conversion_max_rel_diff"],
        "seconds": result["seconds"]}
    out["float_top1"] = arts["keras"].get("top1_accuracy")
    for name in ("tflite_float32", "tflite_int8", ARTIFACT):
        if name in arts:
            out[name] = {k: arts[name].get(k) for k in keep}
    out[ARTIFACT]["source_top1_agreement"] = arts[ARTIFACT].get("source_top1_agreement")
    return out


# ----------------------------------------------------------------------------- ekg-qat
def search_result(workdir: str) -> str:
    """The path of the workdir's sub-network spec, or a UserError saying what to run."""
    spec_path = os.path.join(workdir, "search", "subnet.json")
    if not os.path.exists(spec_path):
        raise UserError(f"no search result at {spec_path}: run ekg-search first (then "
                        "ekg-finetune), which writes it")
    return spec_path


def float_network(config, workdir: str, spec_path: str, weights: str | None, log):
    """(float slim Keras model, info): the fine-tuned network, or the search's weights
    slimmed with BN statistics re-estimated on training images (as ekg-export takes them)."""
    from ekg_tf.data import load_arrays, normalize
    from ekg_tf.slimming import recalibrate_batch_norm
    from ekg_tf.subnet import SubnetSpec
    from ekg_tf.export.weights_io import find_weights, load_slim, sample_indices
    spec = SubnetSpec.from_json(spec_path)
    weights, fine_tuned = find_weights(workdir, weights, config.model.init)
    slim, gated = load_slim(config, spec, weights)
    fine_tuned = fine_tuned or gated is None
    if not fine_tuned:
        train = load_arrays(config.data, "train")
        idx = sample_indices(len(train), config.search.bn_recalibration_images, config.seed)
        norm = config.data.get("normalization") or config.data.name
        recalibrate_batch_norm(slim, normalize(train.x[idx], norm).numpy())
        log(f"[qat] BN statistics re-estimated on {len(idx)} training images")
    log(f"[qat] float network: {weights} (fine-tuned: {fine_tuned})")
    return slim, {"weights": os.path.abspath(weights), "fine_tuned": fine_tuned,
                  "subnet": os.path.abspath(spec_path), "arch": spec.arch}


def run_qat(config, workdir: str, weights: str | None = None, log=None) -> dict:
    """The ekg-qat job (module doc): returns the summary; the report is in workdir/qat/export/."""
    from ekg_tf.config import resolve
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    config = resolve(config)
    check_settings(config)
    check_packages()
    bank_dir = os.path.join(workdir, "memory_bank")
    mode = resolve_mode(str(config.qat.mode), bank_dir)
    spec_path = search_result(workdir)  # these checks come before TensorFlow loads
    from ekg_tf.data import load_arrays, normalization_for
    from ekg_tf.export.weights_io import sample_indices
    from ekg_tf.finetune.runner import check_settings as check_finetune
    check_finetune(config)  # the QAT run takes views, jitter, temperature... from finetune
    float_model, info = float_network(config, workdir, spec_path, weights, log)
    out_dir = os.path.join(workdir, "qat")
    norm_name = config.data.get("normalization") or config.data.name
    normalization = normalization_for(norm_name)
    ecfg = config.export
    test = load_arrays(config.data, "test")
    n_verify = min(int(ecfg.verify_images), len(test))
    images, labels = test.x[:n_verify], test.y[:n_verify]
    job = QATJob(out_dir=out_dir, config=config.to_dict(), mode=mode,
                 bank_dir=bank_dir if mode == "ekg" else None,
                 verify_images=os.path.join(out_dir, "verify_images.npy"),
                 float_fingerprint=float_fingerprint(float_model))
    _check_resume(job)
    os.makedirs(out_dir, exist_ok=True)
    _save_float(float_model, job)
    with atomic_path(job.verify_images) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, normalization.numpy(images))
    log(f"[qat] worker: {mode} QAT of {info['weights']} into {out_dir}")
    result = run_worker(job)
    rep_path = ecfg.representative_path
    rep = (load_arrays(config.data, "train").x if not rep_path else
           __import__("ekg_tf.data.sources", fromlist=["load_npz"]).load_npz(rep_path).x)
    rep = rep[sample_indices(len(rep), ecfg.representative_images, config.seed + 1)]
    report = verify(float_model, job, result, os.path.join(out_dir, "export"), normalization,
                    images, labels, normalization.numpy(rep), ecfg, info, log)
    out = summary(report, result)
    atomic_write_json(os.path.join(out_dir, "summary.json"), out)
    return out


# ----------------------------------------------------------------------------- the Python API
@dataclasses.dataclass
class QATResult:
    """What `quantize_aware` returns."""
    tflite_path: str   # the full-int8 TFLite file of the QAT model
    report: dict       # the export report (float reference, post-training int8, QAT int8)
    summary: dict      # key numbers (as ekg-qat's JSON line)
    result: dict       # the worker's result (training history, conversion parity)


def quantize_aware(model, train_data, test_data, workdir, *, epochs: int = 1, steps: int = 0,
                   batch_size: int = 128, learning_rate: float = 1e-3,
                   schedule: str = "cosine", mode: str = "auto", memory_bank=None,
                   temperature: float = 4.0, calibration_batches: int = 8,
                   range_calibration: str = "mse",
                   views: int = 2, representative_data=None, int8_calibration: str = "mse",
                   latency_runs: int = 20, threads: int = 2, seed: int = 0,
                   log=None) -> QATResult:
    """Quantization-aware fine-tuning of a (pruned) Keras 3 `model`, to full-int8 TFLite.

    `train_data`, `test_data`: (images, labels) arrays or tf.data.Datasets, images as the
    model takes them (as for `model.fit`). Trains `epochs` (or `steps`) with SGD +
    Nesterov momentum at `learning_rate` on a `schedule` (cosine | step | constant),
    flips and shifts as augmentation. `mode`: `ekg` (the EKG distillation over `views`
    augmented views at `temperature` from `memory_bank`, the directory of an EKG memory
    bank whose rows are `train_data`'s images, in order), `float` (distillation from the
    float `model` itself on the same augmented images, no label term: the int8 model
    that agrees most with `model`), `plain` (cross-entropy), `auto` (ekg with a memory
    bank, else plain).
    The activation ranges start from `calibration_batches` training batches (see
    `ekg_tf.qat.quantize.calibrate_ranges`; 0: tfmot's [-6, 6]): `range_calibration`
    `mse` (the int8-error-optimal part of the observed range, kept fixed in training) or
    `minmax` (the mean batch range, then tfmot's moving average).
    The QAT runs in a separate process (tfmot needs tf-keras); `model` is not changed.
    Returns the TFLite path and its verification report (`test_data` as verification
    images; post-training int8 calibrated on `representative_data`, default 256
    training images). Everything is written under `workdir/qat/` (running again resumes).
    """
    from ekg_tf.api import _data_config, as_arrays
    from ekg_tf.config import base_config
    from ekg_tf.data.preprocessing import Normalization
    if int(epochs) < 1 and int(steps) < 1:
        raise UserError("epochs is 0: quantization-aware training needs at least one epoch "
                         "(or steps >= 1)")
    log = log or (lambda msg: None)
    tx, ty = as_arrays(train_data, "train_data", model)
    vx, vy = as_arrays(test_data, "test_data", model)
    if len(tx) < batch_size:
        raise UserError(f"train_data has {len(tx)} images, fewer than one batch of {batch_size}")
    if memory_bank is not None and not os.path.exists(os.path.join(str(memory_bank),
                                                                   "meta.json")):
        raise UserError(f"memory_bank {memory_bank!r} is not a memory bank directory "
                         "(no meta.json)")
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; choose one of {MODES}")
    mode = resolve_mode(mode, None if memory_bank is None else str(memory_bank))
    config = base_config()
    config.data = _data_config(tx)
    config.data.num_classes = int(model.outputs[0].shape[-1])
    config.seed = int(seed)
    config.qat.update(epochs=int(epochs), steps=int(steps), batch_size=int(batch_size),
                      learning_rate=float(learning_rate), schedule=schedule,
                      calibration_batches=int(calibration_batches),
                      range_calibration=str(range_calibration))
    check_packages()
    config.finetune.update(temperature=float(temperature), views=int(views))
    config.export.update(int8_calibration=int8_calibration, latency_runs=int(latency_runs),
                         threads=int(threads))
    check_settings(config)
    out_dir = os.path.join(str(workdir), "qat")
    os.makedirs(out_dir, exist_ok=True)
    arrays = {}
    for name, value in (("train_x", tx), ("train_y", ty), ("test_x", vx), ("test_y", vy)):
        arrays[name] = os.path.join(out_dir, f"{name}.npy")
        with atomic_path(arrays[name]) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, value)
    job = QATJob(out_dir=out_dir, config=config.to_dict(), mode=mode,
                 bank_dir=None if mode != "ekg" else str(memory_bank),
                 verify_images=arrays["test_x"], float_fingerprint=float_fingerprint(model),
                 **arrays)
    _check_resume(job)
    _save_float(model, job)
    result = run_worker(job)
    rep = tx if representative_data is None else as_arrays(
        representative_data, "representative_data", model)[0]
    rep = rep[np.random.default_rng(seed).permutation(len(rep))[:256]]
    report = verify(model, job, result, os.path.join(out_dir, "export"),
                    Normalization((0.0,) * 3, (1.0,) * 3), vx, vy, rep, config.export, {}, log)
    path = next(a["path"] for a in report["artifacts"] if a["name"] == ARTIFACT)
    return QATResult(path, report, summary(report, result), result)
