"""Short EKG vs plain fine-tuning of the searched ResNet-56 on real CIFAR-10, and step throughput.

    python benchmarks/finetune_short.py --search_workdir=runs/r56 [--train_images=10000]

`--search_workdir` must hold `search/` (subnet.json + weights from ekg-search on the
published ResNet-56, target 0.45) and `memory_bank/`. For each mode (ekg, plain) a
workdir `<out>/<mode>/` is made with links to those two folders, and
`ekg_tf.finetune.runner.run_finetune` trains the slimmed network for the same budget
(`--train_images` random training images, `--epochs` epochs, the reference CIFAR
schedule compressed into that budget) and evaluates it on the lossless first 1,000
test images. Then the train step alone is timed on a fixed batch of real images
(+ memory-bank logits): the distillation step (2 views) vs the plain CE step on the
same slimmed network, in alternating rounds (the CPU may be shared: medians).

Use a fresh `--out` to measure again (an existing one resumes: finished runs are not
re-trained). Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared")


def make_config(args, mode):
    from configs.cifar10_resnet56 import get_config
    config = get_config()
    config.model.init = os.path.join(SHARED, "reference", "res56_cifar10.npz")
    config.data.train_path = os.path.join(SHARED, "data", "cifar10", "cifar10_train.npz")
    config.data.test_path = os.path.join(SHARED, "data", "cifar10",
                                         "cifar10_test1000_lossless.npz")
    config.strategy = "one_device"
    config.seed = args.seed  # the training subset, shuffling and augmentation
    config.finetune.mode = mode
    config.finetune.train_subset = args.train_images
    config.finetune.epochs = args.epochs
    config.train.log_every_steps = 10
    config.train.checkpoint_every_steps = 10_000
    return config


def link_workdir(args, mode):
    wd = os.path.join(args.out, mode)
    os.makedirs(wd, exist_ok=True)
    for name in ("search", "memory_bank"):
        dst = os.path.join(wd, name)
        if not os.path.exists(dst):
            os.symlink(os.path.abspath(os.path.join(args.search_workdir, name)), dst)
    return wd


def time_steps(args):
    """Median seconds per train step: distillation (2 views) vs plain CE (1 view)."""
    import numpy as np

    from ekg_tf import data, train
    from ekg_tf.distribute import make_strategy
    from ekg_tf.finetune import runner
    from ekg_tf.finetune.distill import make_distillation_loss

    config = make_config(args, "ekg")
    strategy = make_strategy("one_device")
    gated, spec, _ = runner.load_gated(config, args.search_workdir)
    bank = runner.open_bank(os.path.join(args.search_workdir, "memory_bank"), 50_000, 10,
                            "memory bank")
    arrays = data.load_arrays(config.data, "train")
    batch = int(config.finetune.batch_size)
    idx = np.arange(batch)
    batches = {}
    for mode in ("ekg", "plain"):
        fn, _ = runner.train_input_fn(config, mode, bank if mode == "ekg" else None, batch, 1,
                                      arrays=arrays, indices=idx)
        batches[mode] = next(iter(fn(None)))
    trainers = {}
    for mode, loss_fn, views in (("ekg", make_distillation_loss(4.0), 2),
                                 ("plain", train.cross_entropy_loss, 1)):
        model = runner.build_slim(gated, spec, strategy, sync_bn=False)
        with strategy.scope():
            opt = train.make_optimizer(runner.optimizer_config(config), 1000)
        trainers[mode] = train.Trainer(model, opt, strategy, batch, 5e-4, loss_fn=loss_fn,
                                       grad_scale=1.0 / views)
    for mode, t in trainers.items():  # trace + warm up
        for _ in range(2):
            t.train_step(batches[mode])
    times = {m: [] for m in trainers}
    for _ in range(args.rounds):
        for mode, t in trainers.items():
            for _ in range(args.bench_steps):
                t0 = time.perf_counter()
                t.train_step(batches[mode]).numpy()
                times[mode].append(time.perf_counter() - t0)
    out = {}
    for mode, ts in times.items():
        med = float(np.median(ts))
        out[mode] = {"seconds_per_step": med, "images_per_second": batch / med,
                     "views": 2 if mode == "ekg" else 1, "steps_timed": len(ts)}
    out["ratio_plain_over_ekg_per_image"] = (out["plain"]["images_per_second"]
                                             / out["ekg"]["images_per_second"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--search_workdir", required=True,
                    help="workdir of ekg-search (search/ + memory_bank/)")
    ap.add_argument("--out", default="/tmp/ekg_finetune_short")
    ap.add_argument("--train_images", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="ekg,plain")
    ap.add_argument("--bench_steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip_runs", action="store_true", help="only time the steps")
    ap.add_argument("--skip_steps", action="store_true", help="only the fine-tuning runs")
    args = ap.parse_args()

    from ekg_tf.finetune.runner import run_finetune

    runs = {}
    if not args.skip_runs:
        for mode in args.modes.split(","):
            wd = link_workdir(args, mode)
            t0 = time.time()
            result = run_finetune(make_config(args, mode), wd)
            result["wall_seconds"] = time.time() - t0
            runs[mode] = result
    steps = None if args.skip_steps else time_steps(args)

    print(f"\n{'mode':<8}{'top1 before':>12}{'top1 after':>12}{'train s':>10}{'img/s (run)':>13}")
    for mode, r in runs.items():
        print(f"{mode:<8}{r['top1_before']:>12.4f}{r['top1']:>12.4f}{r['seconds']:>10.1f}"
              f"{r['images_per_second']:>13.1f}")
    if steps:
        print(f"\n{'step':<8}{'views':>6}{'s/step':>10}{'img/s':>10}")
        for mode in ("ekg", "plain"):
            s = steps[mode]
            print(f"{mode:<8}{s['views']:>6}{s['seconds_per_step']:>10.3f}"
                  f"{s['images_per_second']:>10.1f}")
        print(f"plain/ekg images per second: {steps['ratio_plain_over_ekg_per_image']:.2f}x "
              "(CPU shared with other jobs: noisy)")
    summary = {"train_images": args.train_images, "epochs": args.epochs, "seed": args.seed,
               "test": "cifar10_test1000_lossless",
               "runs": {m: {k: r[k] for k in ("top1", "top1_before", "top5", "seconds",
                                              "wall_seconds", "images_per_second", "steps",
                                              "macs", "params", "macs_ratio")}
                        for m, r in runs.items()},
               "step_throughput": steps}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
