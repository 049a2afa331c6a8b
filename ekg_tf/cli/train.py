"""ekg-train: train a dense (unpruned) baseline.

  ekg-train --config=configs/quickstart.py --workdir=/tmp/ekg_quickstart
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ekg_tf.cli import common  # noqa: E402

FLAGS = common.define_flags()


def main(argv):
    config, workdir = common.setup(argv)
    from ekg_tf.train.runner import run_train
    result = run_train(config, workdir)
    result.pop("history")
    common.print_result(result)


def run():
    common.run_app(main)


if __name__ == "__main__":
    run()
