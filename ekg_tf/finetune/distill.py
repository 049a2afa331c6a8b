"""Ensemble-knowledge distillation loss (spec section 7), as pure TF functions.

Shapes: `student` logits `[B, V, C]` (V augmented views of each image),
`teachers` logits `[B, C, T]` (memory bank rows of the same images, teacher 0 =
the lowest-loss teacher), `labels` `[B]`.

Per batch (the reference's `op_utils.Optimizer`):
- `top` = teacher 0; `d_student = sum_b kld(top, mean_v student)`;
- teacher t is selected when `sum_b kld(top, teacher_t) < d_student`
  (teacher 0 is selected whenever `d_student > 0`); `target` = mean of the
  selected teachers' logits (all-zero logits if none is selected, as the
  reference's `sum / max(1, count)`);
- loss = sum over views of `[sum_b CE(label, student_v) + sum_b kld(target,
  student_v)]` divided by the *global* batch size; the caller halves the
  gradients (mean over views: `Trainer(grad_scale=1/V)`).

`kld(p, q) = T * sum softmax(p/T) * (log_softmax(p/T) - log_softmax(q/T))` (T, not T^2).

Under tf.distribute the selection is made on the *global* batch: the per-replica
sums `[d_student, d_teacher_0..T-1]` are all-reduced (one tiny SUM of T+1
floats) before comparing, so N replicas select exactly what one device would on
the whole batch (`selection="replica"` keeps the reference's per-replica sums).
"""
from __future__ import annotations

from ekg_tf.errors import UserError
import tensorflow as tf

SELECTIONS = ("global", "replica")


def kld(p_logits, q_logits, temperature: float, axis: int = -1, keepdims: bool = False):
    """T * KL(softmax(p/T) || softmax(q/T)) along `axis` (per example)."""
    t = tf.cast(temperature, p_logits.dtype)
    log_p = tf.nn.log_softmax(p_logits / t, axis=axis)
    log_q = tf.nn.log_softmax(q_logits / t, axis=axis)
    return t * tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=axis, keepdims=keepdims)


def selection_sums(student, teachers, temperature: float):
    """[d_student, d_teacher_0, ..., d_teacher_{T-1}] summed over this (local) batch.

    d_student = sum_b kld(top, mean over views of student); d_teacher_t = sum_b
    kld(top, teacher_t). No gradient flows through these (they only select).
    """
    student = tf.stop_gradient(tf.cast(student, tf.float32))
    teachers = tf.cast(teachers, tf.float32)
    top = teachers[:, :, 0]
    d_student = tf.reduce_sum(kld(top, tf.reduce_mean(student, axis=1), temperature))
    d_teachers = tf.reduce_sum(kld(top[:, :, None], teachers, temperature, axis=1), axis=0)
    return tf.concat([d_student[None], d_teachers], axis=0)


def cross_replica_sum(x):
    """SUM over the replicas in sync (identity on one replica / outside a strategy)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x)


def teacher_mask(sums):
    """Float mask [T]: 1 for teachers closer to teacher 0 than the student is."""
    return tf.cast(sums[1:] < sums[0], tf.float32)


def distillation_target(teachers, mask):
    """Mean of the selected teachers' logits, [B, C] (zeros if none is selected)."""
    teachers = tf.cast(teachers, tf.float32)
    return tf.reduce_sum(teachers * mask, axis=-1) / tf.maximum(1.0, tf.reduce_sum(mask))


def ekg_loss(student, labels, teachers, temperature: float, global_batch_size: int,
             selection: str = "global", select: bool = True):
    """(loss over the global batch, teacher mask [T]) of section 7.

    `select=False` uses teacher 0 alone as the target (classic KD with one teacher).
    """
    if selection not in SELECTIONS:
        raise UserError(f"unknown teacher selection {selection!r}; choose one of {SELECTIONS}")
    student = tf.cast(student, tf.float32)
    labels = tf.cast(labels, tf.int32)
    num_teachers = teachers.shape[-1]
    if select:
        sums = selection_sums(student, teachers, temperature)
        if selection == "global":
            sums = cross_replica_sum(sums)
        mask = teacher_mask(sums)
    else:
        mask = tf.one_hot(0, num_teachers, dtype=tf.float32)
    target = tf.stop_gradient(distillation_target(teachers, mask))
    total = 0.0
    for v in range(student.shape[1]):
        view = student[:, v]
        ce = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, view))
        total += ce + tf.reduce_sum(kld(target, view, temperature))
    return total / tf.cast(global_batch_size, tf.float32), mask


def student_logits(model, images):
    """[B, V, H, W, 3] -> [B, V, C]: one training-mode forward over all views (shared BN batch)."""
    views = images.shape[1]
    flat = tf.reshape(images, tf.concat([[-1], tf.shape(images)[2:]], axis=0))
    logits = model(flat, training=True)
    return tf.reshape(logits, [-1, views, logits.shape[-1]])


def make_distillation_loss(temperature: float, selection: str = "global", select: bool = True):
    """A `Trainer` loss_fn for batches (images [B,V,...], labels, index, teachers [B,C,T])."""
    if temperature <= 0:
        raise UserError(f"the distillation temperature must be > 0, got {temperature}")
    if selection not in SELECTIONS:
        raise UserError(f"unknown finetune.teacher_selection {selection!r}; "
                         f"choose one of {SELECTIONS}")

    def loss_fn(model, batch, global_batch_size):
        images, labels, teachers = batch[0], tf.cast(batch[1], tf.int32), batch[-1]
        logits = student_logits(model, images)
        loss, _ = ekg_loss(logits, labels, teachers, temperature, global_batch_size,
                           selection=selection, select=select)
        return loss, logits, labels

    return loss_fn
