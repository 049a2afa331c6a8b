"""Distributed training: optimizer, loop, evaluation."""
from ekg_tf.train.evaluate import evaluate, make_eval_step
from ekg_tf.train.loop import (FitResult, Trainer, TrainingDiverged, cross_entropy_loss, fit,
                              synchronize_batch_norm)
from ekg_tf.train.loop import is_chief
from ekg_tf.train.optim import make_optimizer, make_schedule


def run_train(config, workdir, **kwargs):
    """See `ekg_tf.train.runner.run_train` (imported lazily: it pulls in the data stack)."""
    from ekg_tf.train.runner import run_train as run
    return run(config, workdir, **kwargs)
