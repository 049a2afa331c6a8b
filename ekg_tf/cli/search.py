"""`ekg-search --config=configs/cifar10_resnet56.py --workdir=runs/r56`: EKG sub-network search.

Runs the adaptation pass, the greedy search (resumable: run the same command again
after an interruption), writes `workdir/search/` (history.json, subnet.json, plots,
TensorBoard scalars, weights.weights.h5) and the memory bank `workdir/memory_bank/`,
and prints one JSON line: flops_ratio (MACs ratio), params_ratio, steps,
search_seconds, val_loss, val_top1, test_top1_bn_train_mode,
test_top1_bn_recalibrated, memory_bank_bytes_per_image, ...
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ekg_tf.cli import common  # noqa: E402

FLAGS = common.define_flags()


def main(argv):
    config, workdir = common.setup(argv)
    from ekg_tf.subnet_search.pipeline import run_search
    result = run_search(config, workdir)
    common.print_result(result)


def run():
    common.run_app(main)


if __name__ == "__main__":
    run()
