"""ekg-qat: quantization-aware training of the pruned network, to a verified full-int8 TFLite.

  ekg-qat --config=configs/cifar10_resnet56.py --workdir=runs/r56 [--config.qat.epochs=1]

Starts from the fine-tuned network of `workdir/finetune/` (else the search's weights
with re-estimated BN statistics; or --weights), fine-tunes it quantization-aware with
tensorflow-model-optimization for `qat.epochs` (in a worker process of its own: tfmot
needs tf-keras) with the EKG distillation loss when `workdir/memory_bank/` exists,
converts it to full-int8 TFLite and verifies it beside post-training int8
(`workdir/qat/export/`: export report with `tflite_int8_qat`). Run again to resume.
Prints one JSON line (float, post-training int8 and QAT int8 top-1, agreement, sizes,
latency); exits 1 when an artifact fails its tolerance.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from ekg_tf.cli import common  # noqa: E402

FLAGS = common.define_flags()
flags.DEFINE_string("weights", None, "Float weights to start from (default: as ekg-export "
                    "chooses: workdir/finetune/best.keras, last.keras, the search's weights).")


def main(argv):
    config, workdir = common.setup(argv)
    from ekg_tf.qat.pipeline import run_qat
    result = run_qat(config, workdir, weights=FLAGS.weights)
    common.print_result(result)
    if result["status"] != "ok":
        sys.exit(1)


def run():
    common.run_app(main)


if __name__ == "__main__":
    run()
