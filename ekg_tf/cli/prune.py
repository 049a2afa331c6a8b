"""ekg-prune: the whole EKG method in one workdir, from a model to verified deployment artifacts.

  ekg-prune --config=configs/quickstart.py --workdir=runs/digits
  ekg-prune --config=configs/cifar10_resnet56.py --workdir=runs/r56 \
    --config.model.init=../shared/reference/res56_cifar10.npz ...

Stages (`--stages`, comma-separated, in this order): train (the dense network; skipped
by default when config.model.init names weights to prune), search (adaptation, EKG
search, memory bank), finetune (ensemble-knowledge distillation), qat (optional, only
when named: quantization-aware training to a full-int8 TFLite file, verified by the export
stage as tflite_int8_qat; needs ekg_tf[qat]), export (SavedModel, TFLite, ONNX, each
verified). Each stage records that it is done with the config keys
it depends on (`workdir/stages/<stage>.json`): the same command again skips done stages
and resumes an interrupted one (killed at any moment, it gives the uninterrupted
result); a changed config for a stage is refused, naming the keys, unless
`--overwrite=STAGE` (which redoes that stage and the ones after it). Writes
`workdir/report.md` + `report.json` and prints one JSON line: baseline_top1,
pruned_top1, macs_ratio, params_ratio, exports (status per artifact), report, stages.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from ekg_tf.cli import common  # noqa: E402

FLAGS = common.define_flags()
flags.DEFINE_string("stages", None, "Comma-separated stages to run: train,search,finetune,"
                    "[qat,]export (default: all but qat, without train when config.model.init "
                    "is set).")
flags.DEFINE_string("overwrite", None, "Comma-separated stages to redo although done (or started) "
                    "with another config; the stages after them are redone too.")


def main(argv):
    config, workdir = common.setup(argv)
    from ekg_tf.pipeline.runner import run_pipeline
    out = run_pipeline(config, workdir, stages=FLAGS.stages, overwrite=FLAGS.overwrite or ())
    report = out["report"]
    if report is None:  # a non-chief worker: the chief reports
        common.print_result({"status": "done", "worker": "non-chief",
                             "stages": {n: r["status"] for n, r in out["records"].items()}})
        return
    failed = [n for n, s in report["stages"].items() if s["status"] != "done"]
    common.print_result({
        "status": "failed" if failed else "done",
        "baseline_top1": report.get("baseline_top1"), "pruned_top1": report.get("pruned_top1"),
        "macs_ratio": report.get("macs_ratio"), "params_ratio": report.get("params_ratio"),
        "exports": report.get("exports"), "stages": report["stages"],
        "report": report["report_md"], "workdir": report["workdir"]})
    if failed:
        sys.exit(1)


def run():
    common.run_app(main)


if __name__ == "__main__":
    run()
