"""Optimizer and learning-rate schedules (SGD + Nesterov as the reference)."""
from __future__ import annotations

import math

import keras
import tensorflow as tf

from ekg_tf.errors import UserError


class StepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """lr * factor**k after the k-th boundary (boundaries in steps), with linear warmup."""

    def __init__(self, learning_rate, boundaries, factor, warmup_steps=0):
        self.learning_rate = float(learning_rate)
        self.boundaries = [int(b) for b in boundaries]
        self.factor = float(factor)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries]
                          or [tf.constant(0.0)])
        lr = self.learning_rate * tf.pow(self.factor, passed)
        if self.warmup_steps:
            lr = lr * tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
        return lr

    def get_config(self):
        return dict(learning_rate=self.learning_rate, boundaries=self.boundaries,
                    factor=self.factor, warmup_steps=self.warmup_steps)


class CosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Half-cosine from lr to 0 over `total_steps`, with linear warmup."""

    def __init__(self, learning_rate, total_steps, warmup_steps=0):
        self.learning_rate = float(learning_rate)
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        progress = tf.minimum(step / self.total_steps, 1.0)
        lr = 0.5 * self.learning_rate * (1.0 + tf.cos(math.pi * progress))
        if self.warmup_steps:
            lr = lr * tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
        return lr

    def get_config(self):
        return dict(learning_rate=self.learning_rate, total_steps=self.total_steps,
                    warmup_steps=self.warmup_steps)


def make_schedule(train_cfg, total_steps: int, learning_rate: float | None = None):
    lr = train_cfg.learning_rate if learning_rate is None else learning_rate
    if train_cfg.schedule == "step":
        boundaries = [int(round(f * total_steps)) for f in train_cfg.decay_boundaries]
        return StepSchedule(lr, boundaries, train_cfg.decay_factor, train_cfg.warmup_steps)
    if train_cfg.schedule == "cosine":
        return CosineSchedule(lr, total_steps, train_cfg.warmup_steps)
    if train_cfg.schedule == "constant":
        return StepSchedule(lr, [], 1.0, train_cfg.warmup_steps)
    raise UserError(f"unknown train.schedule {train_cfg.schedule!r}; use step, cosine or constant")


def make_optimizer(train_cfg, total_steps: int, learning_rate: float | None = None):
    """SGD with (Nesterov) momentum; weight decay is added to the gradients by the loop."""
    if train_cfg.optimizer != "sgd":
        raise UserError(f"unknown train.optimizer {train_cfg.optimizer!r}; only 'sgd' is supported")
    return keras.optimizers.SGD(learning_rate=make_schedule(train_cfg, total_steps, learning_rate),
                                momentum=train_cfg.momentum, nesterov=train_cfg.nesterov)
