"""What every ekg-* CLI shares: the config/workdir flags, model loading, logging set-up.

A CLI module defines `main(argv)` and `run()`:

    from ekg_tf.cli import common
    FLAGS = common.define_flags()          # --config (ml_collections file), --workdir
    def main(argv):
        config, workdir = common.setup(argv)
        ...
        common.print_result({...})         # last stdout line: one JSON object
    def run():
        common.run_app(main)
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ekg_tf.utils.cli import UserError, print_result, run_main  # noqa: F401  (re-exported)


def define_flags(workdir_required: bool = True):
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py); "
                                    "override keys with --config.a.b=value.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
    if workdir_required:
        flags.mark_flags_as_required(["workdir"])
    return flags.FLAGS


def setup(argv):
    """Validates flags; returns (config, workdir) with the workdir created."""
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; options are --config=... --workdir=...")
    config = flags.FLAGS.config
    if config is None:
        raise UserError("--config is required, e.g. --config=configs/quickstart.py")
    workdir = flags.FLAGS.workdir
    if workdir:
        os.makedirs(workdir, exist_ok=True)
    logging.set_verbosity(logging.WARNING)
    return config, workdir


def build_model_from_config(config, strategy=None, load_init: bool = True):
    """The gated model of `config.model` (weights from `config.model.init` when set)."""
    from ekg_tf.data.sources import num_classes_for
    from ekg_tf.models import build_model
    from ekg_tf.weights import load_weights

    input_shape = (config.data.image_size, config.data.image_size, 3)

    def build():
        model = build_model(config.model.arch, num_classes_for(config.data),
                            input_shape=input_shape, sync_bn=config.model.sync_bn)
        if load_init and config.model.init:
            load_weights(model, config.model.init)
        return model

    if strategy is None:
        return build()
    with strategy.scope():
        return build()


def run_app(main_fn):
    # absl prints usage + a traceback for flag errors; keep its behaviour for flags and
    # turn library errors about the user's input into one clear line.
    app.run(run_main(main_fn), argv=sys.argv)
