"""ekg-export: the pruned model as SavedModel (TF Serving), TFLite and ONNX, every artifact verified.

    ekg-export --config=configs/cifar10_resnet56.py --workdir=runs/r56 \
        --formats=saved_model,tflite,onnx --quantize=none,float16,dynamic,int8

Reads the sub-network `workdir/search/subnet.json` (or --subnet) and the weights
(--weights; default: the fine-tuned model in `workdir/finetune/` if present, else
the search's `workdir/search/weights.weights.h5`, else `config.model.init`). Weights that are not fine-tuned get their BN
statistics re-estimated on training images first (spec section 9). Writes under
`workdir/export/` (or --export_dir), prints one JSON line with per-artifact
status, size, diff and latency, and exits 1 when an artifact fails its tolerance.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from ekg_tf.cli import common  # noqa: E402

FLAGS = common.define_flags()
flags.DEFINE_string("formats", None, "Comma-separated formats: saved_model, tflite, onnx "
                    "(default: config.export.formats).")
flags.DEFINE_string("quantize", None, "Comma-separated TFLite modes: none (float32), float16, "
                    "dynamic, int8 (default: config.export.quantize).")
flags.DEFINE_string("weights", None, "Weights to export (.npz/.pkl/.weights.h5/checkpoint of the "
                    "gated model, or a fine-tuned slim .keras / .weights.h5). Default: "
                    "workdir/finetune/best.keras (or last.keras) if present, else "
                    "workdir/search/weights.weights.h5, else config.model.init.")
flags.DEFINE_string("subnet", None, "Sub-network spec (default workdir/search/subnet.json).")
flags.DEFINE_string("export_dir", None, "Output directory (default workdir/export).")
flags.DEFINE_string("representative_data", None, "An .npz with uint8 'x' training images for "
                    "int8 calibration (default: export.representative_path or the training split).")

def main(argv):
    config, workdir = common.setup(argv)
    from ekg_tf.export.options import check_inputs
    # Before TensorFlow loads: a bad flag or a missing input is refused in a fraction of
    # a second. run_export checks the same again (it is also the Python API).
    check_inputs(config, workdir, FLAGS.formats, FLAGS.quantize, FLAGS.subnet,
                 FLAGS.export_dir, FLAGS.representative_data)
    from ekg_tf.export.runner import run_export, summary
    report = run_export(config, workdir, formats=FLAGS.formats, quantize=FLAGS.quantize,
                        weights=FLAGS.weights, subnet=FLAGS.subnet, export_dir=FLAGS.export_dir,
                        representative_data=FLAGS.representative_data)
    common.print_result(summary(report))
    if report["status"] != "ok":
        sys.exit(1)


def run():
    common.run_app(main)


if __name__ == "__main__":
    run()
