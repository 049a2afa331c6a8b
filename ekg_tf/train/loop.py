"""The distributed custom training loop.

`Trainer` builds one `tf.function` train step that runs under any
`tf.distribute` strategy: per replica, the loss is summed over the replica's
examples and divided by the *global* batch size, weight decay is added to the
gradients as the reference does (`g + wd * v / replicas`), and the optimizer sums
the replicas' gradients. With `jit_compile` only the per-replica
forward/backward is XLA-compiled (compiling the whole distributed step fails).

`fit` adds checkpoints (exact resume: the data pipeline is keyed by epoch and
batch), TensorBoard summaries, a progress bar, evaluation each epoch and
NaN/Inf detection that stops with the last good checkpoint kept.

A step reads nothing back to the host: the step's [loss, correct, images] are summed in
a device variable, and `fit` reads the sums every `log_every` steps and before every
checkpoint or evaluation (one read-back), for TensorBoard, the progress bar and the
NaN/Inf check (so a diverged run is still never checkpointed). Per step the loop only
pulls the next batch and launches the step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ekg_tf.errors import UserError
from ekg_tf.graph import keras_compat
from ekg_tf.train.fused_bn import use_fused_batch_norm
from ekg_tf.train.precision import check_precision, compute_precision, loss_scale
from ekg_tf.utils.io import atomic_write_json
from ekg_tf.utils.progress import ProgressBar


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or Inf."""


def cross_entropy_loss(model, batch, global_batch_size):
    """Plain CE on one view; returns (loss over the global batch, logits, labels)."""
    images, labels = batch[0], tf.cast(batch[1], tf.int32)
    logits = tf.cast(model(images, training=True), tf.float32)  # mixed precision: loss in f32
    per_example = tf.keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                                  from_logits=True)
    return tf.reduce_sum(per_example) / global_batch_size, logits, labels


class Trainer:
    """One distributed SGD step of `loss_fn(model, batch, global_batch_size)`."""

    def __init__(self, model, optimizer, strategy, global_batch_size: int,
                 weight_decay: float = 0.0, loss_fn: Callable = cross_entropy_loss,
                 grad_scale: float = 1.0, jit_compile: bool = False,
                 fused_batch_norm: bool = False, precision: str = "float32"):
        self.model, self.optimizer, self.strategy = model, optimizer, strategy
        self.precision = check_precision(precision)
        if fused_batch_norm:  # the same results in fewer ops (ekg_tf.train.fused_bn)
            use_fused_batch_norm(model)
        self.global_batch_size = int(global_batch_size)
        self.weight_decay = float(weight_decay)
        self.loss_fn = loss_fn
        self.grad_scale = float(grad_scale)
        self.variables = model.trainable_variables
        if jit_compile and strategy.num_replicas_in_sync > 1 and _has_synchronized_bn(model):
            # XLA cannot compile the cross-replica all-reduce of synchronised BN inside the
            # per-replica function ("merge_call called while defining a new graph").
            logging.warning("train.jit_compile is off: synchronised BN across %d replicas "
                            "cannot be XLA-compiled (set model.sync_bn=False to use XLA)",
                            strategy.num_replicas_in_sync)
            jit_compile = False
        self.jit_compile = jit_compile
        with strategy.scope():
            optimizer.build(self.variables)
        self._loss_scale = loss_scale(optimizer)  # mixed_float16 (LossScaleOptimizer)
        # [loss, correct, images] summed over the steps since the last `read_metrics`: kept
        # on the device so that a step needs no host read-back (a GPU keeps running ahead).
        self._metric_sums = tf.Variable(tf.zeros([3]), trainable=False,
                                        name="train_metric_sums")

        def forward_backward(batch):
            with tf.GradientTape() as tape:
                with compute_precision(self.model, self.precision):
                    loss, logits, labels = self.loss_fn(self.model, batch,
                                                        self.global_batch_size)
                loss = tf.cast(loss, tf.float32)
                scaled = self.optimizer.scale_loss(loss) if self._loss_scale is not None \
                    else loss
            grads = tape.gradient(scaled, self.variables)
            return loss, grads, tf.cast(logits, tf.float32), labels

        self._forward_backward = (tf.function(forward_backward, jit_compile=True)
                                  if jit_compile else forward_backward)
        self.train_step = tf.function(self._distributed_step)

    def _replica_step(self, batch):
        loss, grads, logits, labels = self._forward_backward(batch)
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        decay = self.weight_decay / replicas
        if self._loss_scale is not None:  # the optimizer unscales the gradients: decay too
            decay = decay * tf.cast(self._loss_scale, tf.float32)
        grads = [g * self.grad_scale + decay * v for g, v in zip(grads, self.variables)]
        self.optimizer.apply_gradients(zip(grads, self.variables))
        count = tf.cast(tf.shape(labels)[0], tf.float32)  # images, not views
        views = 1
        if len(logits.shape) == 3:  # [batch, views, classes]
            views = logits.shape[1]
            labels = tf.repeat(labels, views)
            logits = tf.reshape(logits, [-1, logits.shape[-1]])
        correct = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32)) / views
        return tf.stack([loss, correct, count])

    def _distributed_step(self, dist_batch):
        iterations = tf.identity(self.optimizer.iterations) if self._loss_scale is not None \
            else None
        per_replica = self.strategy.run(self._replica_step, args=(dist_batch,))
        if iterations is not None:
            # A step the loss scaler skipped (gradients not finite) still counts: the
            # schedule, checkpoints and the resumed data position follow fit's steps.
            self.optimizer.iterations.assign(iterations + 1)
        sums = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        self._metric_sums.assign_add(sums)
        return sums

    def read_metrics(self) -> np.ndarray:
        """[loss, correct, images] summed over the steps since the last call (one host
        read-back), and starts a new sum."""
        sums = self._metric_sums.numpy()
        self._metric_sums.assign(tf.zeros([3]))
        return sums


def synchronize_batch_norm(model, strategy, enabled: bool = True) -> None:
    """Keras BatchNormalization layers use the global batch's statistics when several
    replicas train (`model.sync_bn`): N replicas then compute what one device computes.
    On one replica they stay plain (the synchronised path computes E[x^2] - E[x]^2)."""
    on = bool(enabled) and strategy.num_replicas_in_sync > 1
    for layer in keras_compat.all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = on


def _has_synchronized_bn(model) -> bool:
    return any(getattr(layer, "synchronized", False) for layer in keras_compat.all_layers(model))


@dataclasses.dataclass
class FitResult:
    steps: int
    epochs_done: float
    seconds: float
    images_per_second: float
    last_eval: dict
    best_eval: dict
    history: list


_PRIVATE_WORKDIR = [False]


@contextlib.contextmanager
def private_workdir():
    """Within it, this worker's workdir is its own (ekg-prune gives each non-chief worker a
    private copy): `fit` writes checkpoints, state and summaries there as the chief does,
    so that a resumed run restores the same step on every worker."""
    _PRIVATE_WORKDIR[0] = True
    try:
        yield
    finally:
        _PRIVATE_WORKDIR[0] = False


def writes_workdir(strategy) -> bool:
    """Whether this worker writes the workdir's checkpoints, state and summaries."""
    return _PRIVATE_WORKDIR[0] or is_chief(strategy)


def is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and
                                             resolver.task_id == 0)


class _Checkpoints:
    """The run's checkpoints (latest + best) and its JSON state (evaluation history); a
    non-chief worker (MultiWorkerMirroredStrategy) writes to a scratch folder."""

    def __init__(self, trainer, workdir, keep, extra_objects, name):
        strategy, self.model = trainer.strategy, trainer.model
        self.chief = writes_workdir(strategy)
        ckpt_dir = os.path.join(workdir, "checkpoints")
        if not self.chief:
            ckpt_dir = os.path.join(workdir, "tmp_worker", str(strategy.cluster_resolver.task_id))
        self.ckpt = tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer,
                                        **(extra_objects or {}))
        self.manager = tf.train.CheckpointManager(self.ckpt, ckpt_dir, max_to_keep=keep)
        self.best_manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=trainer.model),
                                                       os.path.join(ckpt_dir, "best"),
                                                       max_to_keep=1)
        self.state_path = os.path.join(workdir, f"{name}_state.json")
        self.state = {"history": [], "best": {}}

    def restore(self):
        if self.manager.latest_checkpoint:
            self.ckpt.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
            if os.path.exists(self.state_path):
                with open(self.state_path) as f:
                    self.state = json.load(f)

    def diverged(self, at_step, what):
        kept = self.manager.latest_checkpoint or "none (no checkpoint was written yet)"
        raise TrainingDiverged(
            f"training diverged at step {at_step}: {what}; stopped without saving. Last good "
            f"checkpoint: {kept}. Lower train.learning_rate or check the data.")

    def save(self, step):
        # A finite loss can still leave Inf/NaN weights behind (a huge update): never
        # checkpoint those.
        if not all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in self.model.weights
                   if tf.as_dtype(v.dtype).is_floating):  # integer state (a QAT step counter)
            self.diverged(step, "the weights are no longer finite")
        self.manager.save(checkpoint_number=step)
        if self.chief:
            atomic_write_json(self.state_path, self.state)

    def saved_at(self, step) -> bool:
        latest = self.manager.latest_checkpoint
        return latest is not None and int(latest.rsplit("-", 1)[1]) == step

    def record_eval(self, result, step):
        """Adds an evaluation to the history; keeps the best (by top-1) weights."""
        self.state["history"].append(result)
        for key in ("top1", "top5", "loss"):
            if key in result:
                tf.summary.scalar(f"eval/{key}", result[key], step=step)
        if result.get("top1", -1) > self.state["best"].get("top1", -1):
            self.state["best"] = result
            self.best_manager.save(checkpoint_number=step)


def _write_train_scalars(running, log_every, optimizer, images, t0, step):
    lr = optimizer.learning_rate
    tf.summary.scalar("loss", running[0] / max(log_every, 1), step=step)
    tf.summary.scalar("accuracy", running[1] / max(running[2], 1), step=step)
    tf.summary.scalar("learning_rate", float(lr.numpy() if hasattr(lr, "numpy") else lr),
                      step=step)
    tf.summary.scalar("images_per_second", images / (time.time() - t0), step=step)


def fit(trainer: Trainer, *, workdir: str, make_train_input: Callable, steps_per_epoch: int,
        total_steps: int, evaluate_fn: Callable | None = None, checkpoint_every: int = 500,
        keep_checkpoints: int = 3, log_every: int = 50, eval_every_epochs: int = 1,
        extra_checkpoint_objects: dict | None = None, name: str = "train",
        on_epoch_end: Callable | None = None, stop_at_step: int | None = None) -> FitResult:
    """Trains to `total_steps`, resuming from `workdir/checkpoints` if a checkpoint is there.

    `make_train_input(start_epoch, skip_batches)` returns a distributed dataset
    that starts at that epoch and batch. `evaluate_fn()` returns a dict with at
    least `top1`; the best (by top1) weights are kept in `workdir/checkpoints/best`.
    `stop_at_step` ends this run early (checkpointed) as if the job were
    preempted there; the schedule still spans `total_steps`.
    """
    optimizer = trainer.optimizer
    ckpts = _Checkpoints(trainer, workdir, keep_checkpoints, extra_checkpoint_objects, name)
    ckpts.restore()
    state = ckpts.state
    start_step = int(optimizer.iterations.numpy())
    if start_step >= total_steps:
        return FitResult(start_step, start_step / steps_per_epoch, 0.0, 0.0,
                         state["history"][-1] if state["history"] else {}, state["best"],
                         state["history"])
    writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard", name)) \
        if ckpts.chief else tf.summary.create_noop_writer()
    epoch, skip = divmod(start_step, steps_per_epoch)
    iterator = iter(make_train_input(epoch, skip))
    bar = ProgressBar(total_steps, desc=name, initial=start_step)
    step = start_step
    t0 = time.time()
    images = 0
    running = np.zeros(3)
    last_eval = state["history"][-1] if state["history"] else {}
    end_step = min(total_steps, stop_at_step or total_steps)
    trainer.read_metrics()  # a fresh sum (a Trainer may have stepped before)
    read_at = step  # metrics on the host up to this step

    def read_back():
        """The device-side sums since the last read-back, added to `running`; a non-finite
        loss stops the run (checked at every read-back, so before every checkpoint)."""
        nonlocal read_at, images
        sums = trainer.read_metrics()
        if not np.isfinite(sums[0]):
            ckpts.diverged(f"{read_at + 1}" if step == read_at + 1 else
                           f"{step} (or earlier, after step {read_at})",
                           f"the loss became {sums[0]}")
        read_at = step
        running[:] += sums
        images += int(sums[2])
        return sums

    with writer.as_default():
        while step < end_step:
            try:
                batch = next(iterator)
            except StopIteration:
                raise UserError(f"the training data ran out at step {step} of {total_steps}; "
                                "is the training split smaller than one batch?") from None
            trainer.train_step(batch)  # no read-back: the sums stay on the device
            step += 1
            epoch_end = step % steps_per_epoch == 0
            evaluate_now = evaluate_fn and (step == total_steps or (
                epoch_end and (step // steps_per_epoch) % eval_every_epochs == 0))
            save_now = evaluate_now or step % checkpoint_every == 0
            log_now = step % log_every == 0 or step == total_steps
            if log_now or save_now or step == end_step:
                steps_read = step - read_at
                sums = read_back()  # the bar shows the mean loss since the last read-back
                bar.update(1, items=trainer.global_batch_size,
                           loss=float(sums[0] / max(steps_read, 1)))
            else:
                bar.update(1, items=trainer.global_batch_size)
            if log_now:
                _write_train_scalars(running, log_every, optimizer, images, t0, step)
                running[:] = 0
            if evaluate_now:
                result = dict(evaluate_fn())
                result.update(step=step, epoch=step / steps_per_epoch)
                last_eval = result
                ckpts.record_eval(result, step)
                if on_epoch_end:
                    on_epoch_end(state["history"])
                ckpts.save(step)
            elif save_now:
                ckpts.save(step)
    if not ckpts.saved_at(step):
        ckpts.save(step)
    bar.close()
    seconds = time.time() - t0
    return FitResult(step, step / steps_per_epoch, seconds, images / max(seconds, 1e-9),
                     last_eval, state["best"], state["history"])
