"""The `ekg-train` job: train the dense (unpruned) network of a config.

`run_train(config, workdir)` trains `config.model` on `config.data` with
`config.train` (resumable: run it again after an interruption), writes
`workdir/model.weights.h5` (plain BN), `accuracy_per_epoch.png`, `checkpoints/`,
`tensorboard/train/`, `train_state.json` and `result.json`, and returns the result.
"""
from __future__ import annotations

import os
import sys

import keras

from ekg_tf import data, flops, train
from ekg_tf.config import resolve
from ekg_tf.distribute import make_strategy, use_jit
from ekg_tf.errors import UserError
from ekg_tf.utils.io import atomic_path, atomic_write_json
from ekg_tf.utils.plots import save_line_plot

WEIGHTS = "model.weights.h5"


def trained_weights(workdir: str) -> str:
    """Where `run_train` leaves the trained weights."""
    return os.path.join(workdir, WEIGHTS)


def run_train(config, workdir: str, log=None, strategy=None) -> dict:
    """Trains (or resumes training) the dense network; returns the result dict."""
    from ekg_tf.cli.common import build_model_from_config
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    config = resolve(config)
    os.makedirs(workdir, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    strategy = strategy or make_strategy(config.strategy)
    tcfg, dcfg = config.train, config.data
    train_arrays = None if dcfg.source == "tfds" else data.load_arrays(dcfg, "train")
    test_arrays = None if dcfg.source == "tfds" else data.load_arrays(dcfg, "test")
    _, n_train = data.input_fn(dcfg, "train", True, dcfg.batch_size, arrays=train_arrays)
    steps_per_epoch = data.pipeline.steps_per_epoch(n_train, dcfg.batch_size)
    if steps_per_epoch == 0:
        raise UserError(f"the training split has {n_train} images, fewer than one batch "
                        f"(data.batch_size={dcfg.batch_size})")
    total_steps = tcfg.steps or tcfg.epochs * steps_per_epoch
    epochs = -(-total_steps // steps_per_epoch)
    model = build_model_from_config(config, strategy)
    train.synchronize_batch_norm(model, strategy, bool(config.model.sync_bn))
    with strategy.scope():
        optimizer = train.make_optimizer(tcfg, total_steps)
    trainer = train.Trainer(model, optimizer, strategy, dcfg.batch_size, tcfg.weight_decay,
                            jit_compile=use_jit(tcfg.jit_compile))

    def make_train_input(start_epoch, skip):
        fn, _ = data.input_fn(dcfg, "train", True, dcfg.batch_size, seed=config.seed,
                              epochs=epochs, start_epoch=start_epoch, skip_batches=skip,
                              arrays=train_arrays)
        return strategy.distribute_datasets_from_function(fn)

    eval_fn_data, _ = data.input_fn(dcfg, "test", False, dcfg.eval_batch_size,
                                    arrays=test_arrays)
    eval_step = train.make_eval_step(model, strategy, "inference")

    def evaluate():
        return train.evaluate(model, strategy, eval_fn_data, eval_step=eval_step)

    def plot(history):
        save_line_plot(os.path.join(workdir, "accuracy_per_epoch.png"),
                       [h["epoch"] for h in history], {"test top-1": [h["top1"] for h in history]},
                       "epoch", "top-1", f"{config.model.arch} on {dcfg.name}")

    result = train.fit(trainer, workdir=workdir, make_train_input=make_train_input,
                       steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                       evaluate_fn=evaluate, checkpoint_every=tcfg.checkpoint_every_steps,
                       keep_checkpoints=tcfg.keep_checkpoints, log_every=tcfg.log_every_steps,
                       eval_every_epochs=tcfg.eval_every_epochs, on_epoch_end=plot)
    train.synchronize_batch_norm(model, strategy, False)  # saved models carry plain BN
    weights_path = trained_weights(workdir)
    with atomic_path(weights_path) as tmp:
        model.save_weights(tmp + ".weights.h5")
        os.replace(tmp + ".weights.h5", tmp)
    complexity = flops.count_complexity(model)
    final = result.last_eval or evaluate()
    out = {"top1": final.get("top1"), "top5": final.get("top5"), "loss": final.get("loss"),
           "best_top1": result.best_eval.get("top1"), "steps": result.steps,
           "epochs": round(result.epochs_done, 3), "seconds": round(result.seconds, 2),
           "images_per_second": round(result.images_per_second, 1),
           "params": complexity.params, "macs": complexity.macs, "weights": weights_path,
           "history": result.history, "workdir": workdir}
    atomic_write_json(os.path.join(workdir, "result.json"), out)
    log(f"trained: test top-1 {out['top1']}")
    return out
