"""The distillation loss of spec section 7 against an independent numpy computation.

Everything here is hand-built: small fixed batches (B=4 images, V=2 views,
C=5 classes, T=3 teachers) where the teacher selection is known in advance
(some / all / none of the teachers selected). Tolerance: 1e-5 relative (float32).
"""
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from ekg_tf.finetune import distill  # noqa: E402


# ----------------------------------------------------------------- independent numpy version
def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_kld(p, q, T):
    """T * sum_c softmax(p/T) (log softmax(p/T) - log softmax(q/T)), per row."""
    lp, lq = np_log_softmax(np.asarray(p) / T), np_log_softmax(np.asarray(q) / T)
    return T * (np.exp(lp) * (lp - lq)).sum(-1)


def np_reference(student, labels, teachers, T, batch):
    """(loss, mask, d_student, d_teachers, dloss/dstudent) written out step by step."""
    student = np.asarray(student, np.float64)
    teachers = np.asarray(teachers, np.float64)
    B, V, C = student.shape
    top = teachers[:, :, 0]
    d_student = np_kld(top, student.mean(1), T).sum()
    d_teachers = np.array([np_kld(top, teachers[:, :, t], T).sum()
                           for t in range(teachers.shape[2])])
    mask = (d_teachers < d_student).astype(np.float64)
    target = (teachers * mask).sum(-1) / max(1.0, mask.sum())
    loss = 0.0
    grad = np.zeros_like(student)
    p_target = np.exp(np_log_softmax(target / T))
    onehot = np.eye(C)[labels]
    for v in range(V):
        s = student[:, v]
        ce = -(np_log_softmax(s)[np.arange(B), labels]).sum()
        loss += ce + np_kld(target, s, T).sum()
        # d/ds [CE] = softmax(s) - y; d/ds [T * KL(p || softmax(s/T))] = softmax(s/T) - p.
        grad[:, v] = (np.exp(np_log_softmax(s)) - onehot
                      + np.exp(np_log_softmax(s / T)) - p_target) / batch
    return loss / batch, mask, d_student, d_teachers, grad


# ----------------------------------------------------------------- fixed batches
LABELS = np.array([0, 3, 1, 4])
T = 4.0


def teachers_some_selected():
    """Teacher 0 = confident on the label; teacher 1 close to it; teacher 2 far (reversed)."""
    top = np.array([[6.0, 1.0, 0.5, -1.0, 0.0],
                    [0.0, 1.0, -2.0, 5.0, 0.5],
                    [1.0, 7.0, 0.0, 0.0, -1.0],
                    [-1.0, 0.0, 2.0, 0.5, 6.5]])
    near = top + np.array([[0.3, -0.2, 0.1, 0.0, -0.1]] * 4)
    far = -top
    return np.stack([top, near, far], -1).astype(np.float32)


def student_between():
    """Two views, moderately far from teacher 0 (closer than the reversed teacher)."""
    base = np.array([[2.0, 1.0, 0.0, 0.0, 0.5],
                     [0.5, 0.5, 0.0, 2.0, 0.0],
                     [0.0, 2.5, 0.5, 0.0, 0.0],
                     [0.0, 0.5, 1.0, 0.0, 1.5]])
    jitter = np.array([[0.2, -0.1, 0.0, 0.1, 0.0]] * 4)
    return np.stack([base + jitter, base - jitter], 1).astype(np.float32)


def run_tf(student, teachers, batch=4, select=True):
    s = tf.constant(student)
    with tf.GradientTape() as tape:
        tape.watch(s)
        loss, mask = distill.ekg_loss(s, tf.constant(LABELS), tf.constant(teachers), T, batch,
                                      select=select)
    return float(loss), mask.numpy(), tape.gradient(loss, s).numpy()


def test_kld_matches_numpy():
    rng = np.random.default_rng(0)
    p, q = rng.normal(0, 3, (6, 7)), rng.normal(0, 3, (6, 7))
    got = distill.kld(tf.constant(p, tf.float32), tf.constant(q, tf.float32), 4.0).numpy()
    np.testing.assert_allclose(got, np_kld(p, q, 4.0), rtol=1e-5, atol=1e-6)
    # T (not T^2) factor: kld at T=1 is the plain KL divergence.
    kl = (np.exp(np_log_softmax(p)) * (np_log_softmax(p) - np_log_softmax(q))).sum(-1)
    got1 = distill.kld(tf.constant(p, tf.float32), tf.constant(q, tf.float32), 1.0).numpy()
    np.testing.assert_allclose(got1, kl, rtol=1e-5, atol=1e-6)
    assert np.all(got >= -1e-6)


def test_some_teachers_selected_hand_computed():
    student, teachers = student_between(), teachers_some_selected()
    loss, mask, grad = run_tf(student, teachers)
    ref_loss, ref_mask, d_s, d_t, ref_grad = np_reference(student, LABELS, teachers, T, 4)
    # The batch was built so that teachers 0 and 1 are selected and the reversed one is not.
    assert d_t[0] == 0 and d_t[1] < d_s < d_t[2], (d_s, d_t)
    np.testing.assert_array_equal(ref_mask, [1, 1, 0])
    np.testing.assert_array_equal(mask, ref_mask)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    # Gradients: the target and the selection carry none (only CE + kld w.r.t. the student).
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # The selection sums themselves.
    sums = distill.selection_sums(tf.constant(student), tf.constant(teachers), T).numpy()
    np.testing.assert_allclose(sums, np.concatenate([[d_s], d_t]), rtol=1e-5, atol=1e-6)


def test_hand_value_of_a_tiny_case():
    """One image, one view, two classes, written out with explicit numbers."""
    student = np.array([[[1.0, 0.0]]], np.float32)           # [B=1, V=1, C=2]
    teachers = np.array([[[2.0, 0.0], [0.0, 0.0]]], np.float32)  # [B, C, T=2]: t0=(2,0), t1=(0,0)
    T2 = 2.0
    # kld(t0, student) at T=2: p = softmax(1, 0), q = softmax(0.5, 0)
    p1 = np.exp(1) / (np.exp(1) + 1)
    q1 = np.exp(0.5) / (np.exp(0.5) + 1)
    d_student = T2 * (p1 * np.log(p1 / q1) + (1 - p1) * np.log((1 - p1) / (1 - q1)))
    d_t1 = T2 * (p1 * np.log(p1 / 0.5) + (1 - p1) * np.log((1 - p1) / 0.5))
    assert d_t1 > d_student  # so only teacher 0 is selected: target = (2, 0)
    ce = np.log(1 + np.exp(-1.0))  # label 0, logits (1, 0)
    expected = ce + d_student
    loss, mask = distill.ekg_loss(tf.constant(student), tf.constant([0]), tf.constant(teachers),
                                  T2, 1)
    np.testing.assert_array_equal(mask.numpy(), [1, 0])
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_all_teachers_selected():
    teachers = teachers_some_selected()
    teachers[:, :, 2] = teachers[:, :, 0] * 0.9  # now every teacher is closer than the student
    student = student_between()
    loss, mask, grad = run_tf(student, teachers)
    ref_loss, ref_mask, _, _, ref_grad = np_reference(student, LABELS, teachers, T, 4)
    np.testing.assert_array_equal(ref_mask, [1, 1, 1])
    np.testing.assert_array_equal(mask, ref_mask)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_none_selected_when_student_equals_teacher0():
    """d_student = 0 and the comparison is strict: no teacher, target = zero logits (uniform)."""
    teachers = teachers_some_selected()
    student = np.stack([teachers[:, :, 0]] * 2, 1)
    loss, mask, _ = run_tf(student, teachers)
    ref_loss, ref_mask, _, _, _ = np_reference(student, LABELS, teachers, T, 4)
    np.testing.assert_array_equal(ref_mask, [0, 0, 0])
    np.testing.assert_array_equal(mask, ref_mask)
    assert loss == pytest.approx(ref_loss, rel=1e-5)


def test_global_batch_divisor_and_kd_target():
    """Divided by the global batch (a replica holds part of it); select=False = teacher 0 only."""
    student, teachers = student_between(), teachers_some_selected()
    loss8, _, _ = run_tf(student, teachers, batch=8)
    loss4, _, _ = run_tf(student, teachers, batch=4)
    assert loss8 == pytest.approx(loss4 / 2, rel=1e-6)
    loss, mask, grad = run_tf(student, teachers, select=False)
    only_top = teachers[:, :, :1]
    ref_loss, ref_mask, _, _, ref_grad = np_reference(student, LABELS, only_top, T, 4)
    np.testing.assert_array_equal(mask, [1, 0, 0])
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_loss_fn_runs_one_forward_over_both_views():
    """make_distillation_loss: [B, V, ...] images -> [B, V, C] logits, loss as ekg_loss."""
    import keras
    teachers = teachers_some_selected()
    images = student_between()  # the "images" are the logits: an identity Dense model
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(
        5, use_bias=False, kernel_initializer="identity")])
    loss_fn = distill.make_distillation_loss(T)
    batch = (tf.constant(images), tf.constant(LABELS), tf.range(4), tf.constant(teachers))
    loss, logits, labels = loss_fn(model, batch, 4)
    np.testing.assert_allclose(logits.numpy(), images, rtol=1e-6)
    ref_loss = np_reference(images, LABELS, teachers, T, 4)[0]
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        distill.make_distillation_loss(0.0)
    with pytest.raises(ValueError, match="teacher_selection"):
        distill.make_distillation_loss(4.0, selection="batch")
