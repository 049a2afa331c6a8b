"""The search objective (ensemble knowledge as reward) and its ablations.

EKG objective of a sub-network on the validation set, per image:
`CE(label, logits) + CE(softmax(K), logits)` (soft-target cross-entropy, T = 1),
averaged over the images; `K` is the running mean of the chosen sub-networks'
logits. Ablations: `loss` (plain CE, no knowledge) and `accuracy` (highest
validation accuracy, ties broken by lower loss).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from ekg_tf.errors import UserError

OBJECTIVES = ("ekg", "loss", "accuracy")


def check_objective(name: str) -> str:
    if name not in OBJECTIVES:
        raise UserError(f"search.objective must be one of {OBJECTIVES}, got {name!r}")
    return name


def knowledge_weight(objective: str) -> float:
    """Weight of the knowledge term in the differentiable objective (scores use it too)."""
    return 1.0 if check_objective(objective) == "ekg" else 0.0


def objective_sum_tf(logits, labels, knowledge, weight: float):
    """Sum over the batch of CE(label) + weight * CE(softmax(K)) (differentiable)."""
    log_p = tf.nn.log_softmax(logits, axis=-1)
    ce = -tf.reduce_sum(tf.one_hot(labels, tf.shape(logits)[-1], dtype=log_p.dtype) * log_p, -1)
    total = tf.reduce_sum(ce)
    if weight:
        soft = tf.nn.softmax(knowledge, axis=-1)
        total += weight * tf.reduce_sum(-tf.reduce_sum(soft * log_p, -1))
    return total


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def evaluate_logits(logits, labels, knowledge) -> dict:
    """Loss (CE), knowledge term, EKG objective and accuracy of validation logits."""
    log_p = _log_softmax(logits)
    labels = np.asarray(labels, np.int64)
    ce = -log_p[np.arange(len(labels)), labels]
    soft = np.exp(_log_softmax(knowledge))
    kce = -(soft * log_p).sum(-1)
    return {"loss": float(ce.mean()), "knowledge_ce": float(kce.mean()),
            "objective": float((ce + kce).mean()),
            "accuracy": float((np.argmax(logits, -1) == labels).mean())}


def reward_key(metrics: dict, objective: str):
    """Sort key of a candidate: the lowest key wins."""
    objective = check_objective(objective)
    if objective == "ekg":
        return (metrics["objective"],)
    if objective == "loss":
        return (metrics["loss"],)
    return (-metrics["accuracy"], metrics["loss"])


def update_knowledge(knowledge, count: int, new_logits):
    """Running mean of the chosen sub-networks' logits: `(K*t + k_new)/(t+1)`."""
    knowledge = np.asarray(knowledge, np.float32)
    new_logits = np.asarray(new_logits, np.float32)
    if knowledge.shape != new_logits.shape:
        raise ValueError(f"knowledge {knowledge.shape} and logits {new_logits.shape} differ")
    return ((knowledge * count + new_logits) / (count + 1)).astype(np.float32), count + 1
