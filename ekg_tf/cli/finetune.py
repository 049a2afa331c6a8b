"""ekg-finetune: fine-tune the searched sub-network (physically slimmed) with ensemble knowledge.

  ekg-finetune --config=configs/cifar10_resnet56.py --workdir=runs/r56

Reads `workdir/search/subnet.json` (+ the search's weights) and, for
`finetune.mode=ekg`, the memory bank `workdir/memory_bank/`; writes
`workdir/finetune/` (best.keras, last.keras, result.json, accuracy_per_epoch.png,
checkpoints, TensorBoard). Run the same command again to resume. Ablations:
`--config.finetune.mode=plain` (cross-entropy only) or `kd` (unpruned network as
the only teacher). Prints one JSON line: top1, top5, epochs, macs, params,
seconds, mode, top1_before (re-estimated BN, before training), ...
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ekg_tf.cli import common  # noqa: E402

FLAGS = common.define_flags()


def main(argv):
    config, workdir = common.setup(argv)
    from ekg_tf.finetune.runner import run_finetune
    common.print_result(run_finetune(config, workdir))


def run():
    common.run_app(main)


if __name__ == "__main__":
    run()
