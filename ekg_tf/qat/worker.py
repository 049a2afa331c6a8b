"""The QAT worker process: `python -m ekg_tf.qat.worker JOB.json` (see `ekg_tf.qat.job`).

tfmot 0.8 quantizes only tf-keras models and sets TF_USE_LEGACY_KERAS=1 when
imported, which turns `tf.keras` into tf-keras for the whole process. So QAT runs
here, in a process of its own, and the caller's Keras 3 is never touched. In this
process `tf.keras` is tf-keras from the start; Keras 3 (`import keras`) only loads the
float network, which is converted to tf-keras (`ekg_tf.qat.convert`).

Steps: load the float network -> convert it to tf-keras and check that both compute
the same logits -> tfmot's quantization-aware model (`ekg_tf.qat.quantize`) -> fine-tune
it with the project's input pipeline, `Trainer` and `fit` (resumable checkpoints,
TensorBoard, progress bar, per-epoch evaluation) and the EKG distillation loss from
the memory bank (mode `ekg`), distillation from the float network itself (`float`) or
cross-entropy (`plain`) -> convert the trained QAT
model to full-int8 TFLite (every op int8; ranges from training) -> write the outputs
(`ekg_tf.qat.job.FILES`), the result last.

Exit status: 0 done; 2 bad input (one `error: ...` line on stderr); anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow loads: tf.keras is tf-keras here
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# Logits of the converted tf-keras model vs the Keras 3 float network: the same float32
# function computed by other layer code (measured ~1e-7 relative).
PARITY_REL_TOL = 1e-4


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def max_rel_diff(reference, other) -> float:
    import numpy as np
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    return float(np.abs(reference - other).max() / max(np.abs(reference).max(), 1e-12))


def qat_finetune_config(config):
    """`config` with the `finetune` keys that `config.qat` sets (the QAT run reuses the
    fine-tuning's input pipeline, loss, optimizer and schedule helpers)."""
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        for key in ("epochs", "steps", "batch_size", "learning_rate", "schedule",
                    "warmup_steps", "train_subset"):
            cfg.finetune[key] = config.qat[key]
    return cfg


def qat_temperature(config) -> float:
    """qat.temperature, else the fine-tuning's temperature (finetune.temperature or auto)."""
    from ekg_tf.finetune.runner import resolve_temperature
    return float(config.qat.get("temperature", 0.0) or 0.0) or resolve_temperature(config)


def tf_keras_optimizer(train_cfg, total_steps: int):
    """tf-keras SGD (Nesterov momentum) on the project's learning-rate schedule."""
    import tf_keras
    from ekg_tf.train.optim import make_schedule
    schedule = make_schedule(train_cfg, total_steps)  # pure TF arithmetic of the step

    class Schedule(tf_keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return schedule(step)

        def get_config(self):
            return schedule.get_config()

    if train_cfg.optimizer != "sgd":
        raise ValueError(f"unknown optimizer {train_cfg.optimizer!r}; only 'sgd' is supported")
    return tf_keras.optimizers.SGD(Schedule(), momentum=float(train_cfg.momentum),
                                   nesterov=bool(train_cfg.nesterov))


def _arrays(x_path, y_path):
    import numpy as np
    from ekg_tf.data import ArraySplit
    return ArraySplit(np.load(x_path, mmap_mode="r"), np.load(y_path))


def float_distillation_loss(teacher, temperature: float):
    """Mode `float`: a `Trainer` loss_fn distilling the float network into the QAT model on
    the very images of the batch (augmented as in training; the float network runs in
    inference mode beside the student). No label term: QAT learns to compute the float
    network's function under int8 rounding, not to keep fine-tuning it (with the EKG
    loss's cross-entropy, 150 steps moved 2.9% of the pruned ResNet-56's test
    predictions while raising its top-1)."""
    import tensorflow as tf
    from ekg_tf.finetune.distill import kld

    def loss_fn(model, batch, global_batch_size):
        images, labels = batch[0], tf.cast(batch[1], tf.int32)
        logits = model(images, training=True)
        target = tf.stop_gradient(teacher(images, training=False))
        loss = tf.reduce_sum(kld(target, logits, temperature))
        return loss / tf.cast(global_batch_size, tf.float32), logits, labels

    return loss_fn


def freeze_batch_norm(model) -> list:
    """Puts every BatchNormalization of the QAT `model` in inference mode for good (a
    non-trainable tf-keras BN ignores `training=True`: moving statistics, neither updated
    nor replaced by batch statistics; gamma and beta still train, as with PyTorch's
    `freeze_bn_stats`). Returns those BN layers."""
    import tf_keras
    frozen = []
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)  # QuantizeWrapper(V2) holds the layer
        if isinstance(inner, tf_keras.layers.BatchNormalization):
            inner.trainable = False
            frozen.append(inner)
    return frozen


def moving_statistics(bn_layers) -> list:
    return [v.numpy().copy() for bn in bn_layers for v in (bn.moving_mean, bn.moving_variance)]


def train_qat(model, float_model, config, job, strategy):
    """Fine-tunes the QAT `model` (resumable, in `job.out_dir`); `float_model`: the float
    tf-keras network (mode `float`'s teacher). Returns (FitResult, info)."""
    from ekg_tf import data, train
    from ekg_tf.data.pipeline import steps_per_epoch as count_steps
    from ekg_tf.finetune.distill import make_distillation_loss
    from ekg_tf.finetune.runner import (check_bank, optimizer_config,
                                        train_input_fn, train_subset_indices)
    import tensorflow as tf
    from ekg_tf.errors import UserError
    cfg = qat_finetune_config(config)
    ft, dcfg = cfg.finetune, cfg.data
    train_arrays = (_arrays(job.train_x, job.train_y) if job.train_x
                    else data.load_arrays(dcfg, "train"))
    test_arrays = (_arrays(job.test_x, job.test_y) if job.test_x
                   else data.load_arrays(dcfg, "test"))
    n_split = len(train_arrays)
    classes = int(model.outputs[0].shape[-1])
    indices = train_subset_indices(n_split, int(ft.train_subset), int(cfg.seed))
    teachers = None
    if job.mode == "ekg":
        teachers = check_bank(job.bank_dir, n_split, classes)
    n_train = n_split if indices is None else len(indices)
    batch = int(ft.batch_size or dcfg.batch_size)
    steps_per_epoch = count_steps(n_train, batch)
    if steps_per_epoch == 0:
        raise UserError(f"{n_train} training images are fewer than one batch of {batch}")
    total_steps = int(ft.steps) or int(ft.epochs) * steps_per_epoch
    epochs = -(-total_steps // steps_per_epoch)
    views = 1 if job.mode in ("plain", "float") else int(ft.views)
    with cfg.unlocked():
        cfg.finetune.views = views  # the input pipeline's views (1: images [B, H, W, 3])
    temperature = qat_temperature(cfg)
    with strategy.scope():
        optimizer = tf_keras_optimizer(optimizer_config(cfg), total_steps)
    if job.mode == "plain":
        loss_fn = train.cross_entropy_loss
    elif job.mode == "float":
        loss_fn = float_distillation_loss(float_model, temperature)
    else:
        loss_fn = make_distillation_loss(temperature, ft.teacher_selection)
    trainer = train.Trainer(model, optimizer, strategy, batch, float(ft.weight_decay),
                            loss_fn=loss_fn, grad_scale=1.0 / views)
    eval_fn, _ = data.input_fn(dcfg, "test", False, int(dcfg.eval_batch_size),
                               arrays=test_arrays)
    eval_step = train.make_eval_step(model, strategy, "inference")

    def make_train_input(start_epoch, skip):
        fn, _ = train_input_fn(cfg, job.mode, teachers, batch, epochs, start_epoch, skip,
                               arrays=train_arrays, indices=indices)
        return strategy.distribute_datasets_from_function(fn)

    from ekg_tf.qat.quantize import fixed_activation_ranges
    calibrated, method = 0, str(cfg.qat.range_calibration)
    if not tf.train.latest_checkpoint(os.path.join(job.out_dir, "checkpoints")):
        calibrated = calibrate(model, cfg, job.mode, batch, train_arrays, indices)
        _log(f"[qat] {calibrated} activation ranges calibrated ({method}) on "
             f"{int(cfg.qat.calibration_batches)} training batches")
    _log(f"[qat] quantization-aware fine-tuning ({job.mode}, {views} view(s), {n_train} "
         f"images, {total_steps} steps of {batch}, lr {float(ft.learning_rate):g} {ft.schedule})")
    # mse: the calibrated ranges stay (tfmot's moving average would pull them back
    # towards the batch [min, max]); minmax: they start at that moving average's fixed point.
    ranges = fixed_activation_ranges() if method == "mse" else contextlib.nullcontext()
    with ranges:
        result = train.fit(trainer, workdir=job.out_dir, make_train_input=make_train_input,
                           steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                           evaluate_fn=lambda: train.evaluate(model, strategy, eval_fn,
                                                              eval_step=eval_step),
                           checkpoint_every=int(cfg.train.checkpoint_every_steps),
                           keep_checkpoints=int(cfg.train.keep_checkpoints),
                           log_every=int(cfg.train.log_every_steps), name="qat")
    info = {"mode": job.mode, "views": views,
            "temperature": None if job.mode == "plain" else temperature,
            "train_images": n_train, "steps": result.steps, "total_steps": total_steps,
            "epochs": round(result.epochs_done, 3), "batch_size": batch,
            "learning_rate": float(ft.learning_rate), "schedule": ft.schedule,
            "teachers": 1 if job.mode == "float" else getattr(teachers, "num_teachers", 0),
            "calibration_batches": int(cfg.qat.calibration_batches),
            "range_calibration": method,
            "calibrated_ranges": calibrated}
    return result, info


def calibrate(model, cfg, mode, batch, train_arrays, indices) -> int:
    """Sets the QAT model's activation ranges from `qat.calibration_batches` batches of
    the training input (augmented views as in training); 0 batches: tfmot's start."""
    import itertools
    import numpy as np
    from ekg_tf.finetune.runner import train_input_fn
    from ekg_tf.qat.quantize import calibrate_ranges
    count = int(cfg.qat.calibration_batches)
    if count <= 0:
        return 0
    fn, _ = train_input_fn(cfg, mode, None, batch, 1, arrays=train_arrays, indices=indices)

    def images():
        for element in itertools.islice(fn(None), count):
            x = element[0].numpy()
            yield x.reshape((-1, *x.shape[-3:])) if x.ndim == 5 else x  # views flattened

    return calibrate_ranges(model, images(), str(cfg.qat.range_calibration), int(cfg.seed))


def to_tflite(model) -> bytes:
    """Full-int8 TFLite of a trained QAT model (input `images` float32, output `logits`):
    every op between the input's QUANTIZE and the output's DEQUANTIZE is int8, with the
    ranges learnt in training (no calibration data; `float_ops` refuses anything else)."""
    import tensorflow as tf
    shape = [None, *(int(d) for d in model.inputs[0].shape[1:])]
    fn = tf.function(lambda images: {"logits": model(images, training=False)},
                     input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()],
                                                                model)
    # Not target_spec.supported_ops = INT8: TF 2.21 then demands a representative dataset
    # even for a QAT graph (its check runs before the graph is read); every op is
    # checked to be int8 below instead.
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    blob = converter.convert()
    left = float_ops(blob)
    if left:
        raise RuntimeError(f"the QAT TFLite model still computes in float: {left}")
    return blob


def float_ops(blob: bytes) -> list:
    """The ops of a TFLite model that compute in float (besides the input QUANTIZE and the
    output DEQUANTIZE)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    interpreter = Interpreter(  # the model's own ops (no XNNPACK DELEGATE nodes)
        model_content=blob,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    left = []
    for op in interpreter._get_ops_details():  # pylint: disable=protected-access
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        dtypes = {tensors[i]["dtype"].__name__ for i in op["outputs"]}
        if dtypes - {"int8", "int32"}:
            left.append(f"{op['op_name']} ({'/'.join(sorted(dtypes))})")
    return left


def run(job) -> dict:
    import time
    import keras
    import ml_collections
    import numpy as np
    import tensorflow as tf
    from ekg_tf.distribute import make_strategy
    from ekg_tf.qat.convert import to_tf_keras
    from ekg_tf.qat.quantize import quantize_aware_model
    from ekg_tf.utils.io import atomic_path, atomic_write_json
    start = time.time()
    config = ml_collections.ConfigDict(job.config)
    keras.utils.set_random_seed(int(config.seed))
    float_model = keras.models.load_model(job.path("float_model"), compile=False, safe_mode=True)
    verify = None if job.verify_images is None else np.load(job.verify_images)
    sample = verify[:64] if verify is not None else np.random.default_rng(0).normal(
        size=(16, *float_model.inputs[0].shape[1:])).astype(np.float32)

    strategy = make_strategy(config.strategy)
    with strategy.scope():  # the float tf-keras network is also mode float's teacher
        converted = to_tf_keras(float_model)
    parity = max_rel_diff(float_model(sample, training=False), converted(sample, training=False))
    if not parity <= PARITY_REL_TOL:
        raise RuntimeError(f"the tf-keras conversion computes other logits than the Keras 3 "
                           f"network (max relative diff {parity:.3g} > {PARITY_REL_TOL:g})")
    _log(f"[qat] converted to tf-keras: {len(converted.layers)} layers, logits equal to "
         f"{parity:.2g} (relative)")
    with strategy.scope():
        qat = quantize_aware_model(converted)
    frozen = freeze_batch_norm(qat) if bool(config.qat.get("freeze_bn", True)) else []
    statistics_before = moving_statistics(frozen)
    fit_result, info = train_qat(qat, converted, config, job, strategy)
    moved = max((float(np.abs(a - b).max()) for a, b in
                 zip(statistics_before, moving_statistics(frozen))), default=0.0)

    blob = to_tflite(qat)
    with atomic_path(job.path("tflite")) as tmp:
        with open(tmp, "wb") as f:
            f.write(blob)
    if verify is not None:
        predict = tf.function(lambda x: qat(x, training=False), reduce_retracing=True)
        logits = np.concatenate([predict(tf.constant(verify[i:i + 250])).numpy()
                                 for i in range(0, len(verify), 250)])
        with atomic_path(job.path("qat_logits")) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, logits)
    final = fit_result.last_eval
    result = {"status": "done" if fit_result.steps >= info["total_steps"] else "incomplete",
              "conversion_max_rel_diff": parity, "float_fingerprint": job.float_fingerprint,
              "qat_keras_top1": final.get("top1"), "qat_keras_loss": final.get("loss"),
              "history": fit_result.history, **info,
              "frozen_batch_norms": len(frozen), "frozen_statistics_max_change": moved,
              "quantized_layers": sum(type(l).__name__.startswith("QuantizeWrapper")
                                      for l in qat.layers),
              "tflite": job.path("tflite"), "tflite_bytes": len(blob),
              "train_seconds": round(fit_result.seconds, 2),
              "images_per_second": round(fit_result.images_per_second, 1),
              "seconds": round(time.time() - start, 2)}
    atomic_write_json(job.path("result"), result)
    return result


def main(argv) -> int:
    from ekg_tf.qat.convert import ConversionError
    from ekg_tf.qat.job import QATJob
    from ekg_tf.errors import UserError
    if len(argv) != 2:
        print("usage: python -m ekg_tf.qat.worker JOB.json", file=sys.stderr)
        return 2
    try:
        run(QATJob.read(argv[1]))
    except (UserError, ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
