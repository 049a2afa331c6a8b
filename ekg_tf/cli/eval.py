"""ekg-eval: evaluate weights (or a checkpoint, optionally a sub-network) on a dataset.

  ekg-eval --config=configs/cifar10_resnet56.py \
    --config.model.init=../shared/reference/res56_cifar10.npz \
    --config.data.source=npz \
    --config.data.test_path=../shared/data/cifar10/cifar10_test1000_lossless.npz
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from ekg_tf.cli import common  # noqa: E402

FLAGS = common.define_flags(workdir_required=False)
flags.DEFINE_enum("bn_mode", "inference", ["inference", "batch_stats", "both"],
                  "BN statistics: moving (inference), per-batch (the reference's test "
                  "script; never updates the model), or both.")
flags.DEFINE_string("subnet", None, "Optional sub-network spec (search/subnet.json) to apply.")
flags.DEFINE_integer("seed", 0, "Shuffle seed for batch-statistics evaluation.")


def main(argv):
    config, _ = common.setup(argv)
    if not config.model.init:  # refused before TensorFlow loads
        raise common.UserError("nothing to evaluate: set --config.model.init to a weights file "
                               "(.npz/.pkl/.weights.h5) or a checkpoint directory")
    from ekg_tf import data, flops, train
    from ekg_tf.distribute import make_strategy
    from ekg_tf.subnet import SubnetSpec

    strategy = make_strategy(config.strategy)
    dcfg = config.data
    test_arrays = None if dcfg.source == "tfds" else data.load_arrays(dcfg, "test")
    model = common.build_model_from_config(config, strategy, gated=True)
    if FLAGS.subnet:
        SubnetSpec.from_json(FLAGS.subnet).apply_to(model)
    modes = ["inference", "batch_stats"] if FLAGS.bn_mode == "both" else [FLAGS.bn_mode]
    results = {}
    for mode in modes:
        # Batch statistics need mixed batches: a class-grouped test set is shuffled.
        fn, _ = data.input_fn(dcfg, "test", False, dcfg.eval_batch_size,
                              shuffle=mode == "batch_stats", seed=FLAGS.seed,
                              arrays=test_arrays)
        results[mode] = train.evaluate(model, strategy, fn, bn_mode=mode)
    complexity = flops.count_complexity(model)
    first = results[modes[0]]
    out = {"top1": first["top1"], "top5": first["top5"], "loss": first["loss"],
           "bn_mode": modes[0], "examples": first["examples"],
           "params": complexity.params, "macs": complexity.macs,
           "arch": config.model.arch, "weights": config.model.init}
    if len(modes) > 1:
        out["batch_stats"] = results["batch_stats"]
    common.print_result(out)


def run():
    common.run_app(main)


if __name__ == "__main__":
    run()
