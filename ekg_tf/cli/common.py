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
    from ekg_tf.config import resolve
    return resolve(config), workdir


def build_model_from_config(config, strategy=None, load_init: bool = True,
                            gated: bool = False):
    """The model of `config.model` (weights from `config.model.init` when set); with
    `gated`, its gated clone (channel groups, rates)."""
    from ekg_tf.graph.gated import GatedModel
    from ekg_tf.models.sources import model_from_config

    def build():
        model = model_from_config(config, load_init=load_init)
        return GatedModel(model, sync_bn=bool(config.model.sync_bn)) if gated else model

    if strategy is None:
        return build()
    with strategy.scope():
        return build()


def parse_flags(argv):
    """absl's flag parsing, except that an unknown config key (`--config.a.typo=1`, which
    ml_collections reports as an AttributeError deep in the parser) is one clear line."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        import re
        text = str(e)
        found = re.search(r"[A-Za-z_]\w*", text)
        missing = found.group(0) if found else text
        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        bad = [a for a in overrides if missing in a[len("--config."):].split(".")]
        suggestion = re.search(r'Did you mean "([^"]+)"', text)
        message = (f"unknown config key {missing!r} in {(bad or overrides or ['--config'])[0]}"
                   + (f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""))
        print(f"error: {message}", file=sys.stderr)
        print_result({"status": "error", "error": message})
        sys.exit(2)


def run_app(main_fn):
    # absl prints usage for malformed flags; an unknown config key and library errors
    # about the user's input become one clear line.
    app.run(run_main(main_fn), argv=sys.argv, flags_parser=parse_flags)
