"""Distributed training: optimizer, loop, evaluation."""
from ekg_tf.train.evaluate import evaluate, make_eval_step
from ekg_tf.train.loop import (FitResult, Trainer, TrainingDiverged, cross_entropy_loss, fit,
                              synchronize_batch_norm)
from ekg_tf.train.optim import make_optimizer, make_schedule
