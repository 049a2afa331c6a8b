"""EKG vs KD vs plain fine-tuning of the searched ResNet-56 at the same real budget.

    python benchmarks/finetune_budget.py --search_workdir=runs/r56_045 --out=runs/budget

`--search_workdir` holds `search/` (subnet.json + weights.weights.h5 of ekg-search on the
published ResNet-56 to 0.45 MACs, reference settings) and `memory_bank/`; it is only
read: both folders are copied into `<out>/<mode>/` for each mode. Every mode fine-tunes
the same slimmed network with `ekg_tf.finetune.runner.run_finetune` (the ekg-finetune
job) for the same budget: `--epochs` (default 8) epochs over the 50,000 training
images, batch 128, the reference CIFAR schedule (SGD Nesterov 0.9, lr 1e-2 decayed by
0.2 at 30/60/80% of fine-tuning, weight decay 5e-4) compressed to that length:
- `ekg`: ensemble-knowledge distillation from the memory bank (two jittered views);
- `kd`: the same loss with the unpruned network as the only teacher;
- `plain`: cross-entropy on one view.
Test top-1 of the last epoch's model on the 1,000 lossless test images (comparable to
published numbers), on the 10,000 JPEG-decoded test images (about 10 points low: for
comparing the modes only), and seconds per epoch (this machine may be shared: say so).

Interrupted, the same command continues each mode from its last checkpoint (modes
already finished are not re-trained). Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared")
CIFAR = os.path.join(SHARED, "data", "cifar10")


def make_config(args, mode):
    from configs.cifar10_resnet56 import get_config
    config = get_config()
    config.model.init = os.path.join(SHARED, "reference", "res56_cifar10.npz")
    config.data.train_path = os.path.join(CIFAR, "cifar10_train.npz")
    config.data.test_path = os.path.join(CIFAR, "cifar10_test1000_lossless.npz")
    config.strategy = "one_device"
    config.seed = args.seed
    config.finetune.mode = mode
    config.finetune.epochs = args.epochs
    config.train.log_every_steps = 50
    config.train.checkpoint_every_steps = 200  # an interrupted run loses < 200 steps
    return config


def mode_workdir(args, mode):
    """`<out>/<mode>/` with its own copy of the search outputs (the source is never written;
    plain fine-tuning needs no memory bank)."""
    wd = os.path.join(args.out, mode)
    names = ("search",) if mode == "plain" else ("search", "memory_bank")
    if "memory_bank" in names and not os.path.exists(
            os.path.join(args.search_workdir, "memory_bank", "meta.json")):
        sys.exit(f"{args.search_workdir}/memory_bank is not complete (no meta.json) yet")
    for name in names:
        dst = os.path.join(wd, name)
        if not os.path.exists(dst):
            tmp = dst + ".copying"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(os.path.join(args.search_workdir, name), tmp)
            os.replace(tmp, dst)
    return wd


def timed_finetune(config, workdir):
    """run_finetune, adding this invocation's training time to `<workdir>/timing.json` so
    that seconds per epoch stay right across interruptions."""
    from ekg_tf.finetune.runner import run_finetune
    from ekg_tf.utils.io import atomic_write_json
    path = os.path.join(workdir, "timing.json")
    timing = json.load(open(path)) if os.path.exists(path) else {"runs": []}
    result = run_finetune(config, workdir)
    # This invocation's steps (it may have resumed from a checkpoint that an earlier,
    # killed invocation wrote without reaching this point): its images / the batch.
    steps_run = round(result["seconds"] * result["images_per_second"]
                      / int(config.finetune.batch_size or config.data.batch_size))
    if steps_run > 0:
        timing["runs"].append({"steps_after": result["steps"], "seconds": result["seconds"],
                               "steps": steps_run, "time": time.time()})
        atomic_write_json(path, timing)
    steps = sum(r["steps"] for r in timing["runs"])
    seconds = sum(r["seconds"] for r in timing["runs"])
    steps_per_epoch = result["total_steps"] / config.finetune.epochs
    result["seconds_per_epoch"] = seconds / max(steps, 1) * steps_per_epoch
    result["train_seconds"] = seconds
    return result


def jpeg_top1(model_path):
    """Top-1 of a saved slim model on the 10,000 JPEG-decoded test images (BN inference)."""
    import keras
    import numpy as np
    from ekg_tf.data import normalize
    with np.load(os.path.join(CIFAR, "cifar10_test.npz")) as f:
        x, y = f["x"], f["y"].astype(np.int64)
    model = keras.models.load_model(model_path, compile=False, safe_mode=True)
    logits = np.concatenate([model(normalize(x[i:i + 500], "cifar10"), training=False).numpy()
                             for i in range(0, len(x), 500)])
    return float(np.mean(np.argmax(logits, 1) == y))


def plot_modes(args, runs) -> str:
    """`<out>/top1_per_epoch.png`: test top-1 (1,000 lossless) per epoch, one line per mode."""
    from ekg_tf.utils.plots import save_line_plot
    series = {}
    for mode, r in runs.items():
        with open(os.path.join(args.out, mode, "finetune", "finetune_state.json")) as f:
            history = json.load(f)["history"]
        series[mode] = [r["top1_before"]] + [e["top1"] for e in history]
    path = os.path.join(args.out, "top1_per_epoch.png")
    epochs = range(max(len(v) for v in series.values()))
    save_line_plot(path, epochs, series, "epoch", "test top-1 (1,000 lossless images)",
                   f"ResNet-56 searched to 0.45 MACs: {args.epochs} epochs per mode")
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--search_workdir", required=True,
                    help="workdir of ekg-search (search/ + memory_bank/); only read")
    ap.add_argument("--out", default="runs/finetune_budget")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--modes", default="ekg,kd,plain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train_subset", type=int, default=0,
                    help="> 0: only this many training images (a quick check of the script)")
    args = ap.parse_args()

    runs = {}
    for mode in args.modes.split(","):
        config = make_config(args, mode)
        config.finetune.train_subset = args.train_subset
        wd = mode_workdir(args, mode)
        result = timed_finetune(config, wd)
        result["jpeg10k_top1"] = jpeg_top1(result["last"])
        runs[mode] = result
        print(f"[budget] {mode}: {json.dumps({k: result[k] for k in ('top1', 'best_top1', 'jpeg10k_top1', 'seconds_per_epoch')})}",
              file=sys.stderr, flush=True)

    print(f"\nResNet-56 searched to 0.45 MACs, {args.epochs} epochs over "
          f"{runs[next(iter(runs))]['train_images']} training images each "
          "(reference schedule compressed; seconds under a shared CPU)")
    print(f"{'mode':<7}{'top1 before':>12}{'top1 1000':>11}{'best 1000':>11}{'top1 JPEG10k':>14}"
          f"{'s/epoch':>9}{'epochs':>8}")
    for mode, r in runs.items():
        print(f"{mode:<7}{r['top1_before']:>12.4f}{r['top1']:>11.4f}{r['best_top1']:>11.4f}"
              f"{r['jpeg10k_top1']:>14.4f}{r['seconds_per_epoch']:>9.1f}{r['epochs']:>8.2f}")
    print(f"plot: {plot_modes(args, runs)}")
    keys = ("top1", "best_top1", "top1_before", "jpeg10k_top1", "seconds_per_epoch",
            "train_seconds", "epochs", "steps", "train_images", "teachers", "macs_ratio",
            "params_ratio")
    print(json.dumps({"epochs": args.epochs, "seed": args.seed,
                      "test": "cifar10_test1000_lossless (+ JPEG 10k, relative only)",
                      "runs": {m: {k: r.get(k) for k in keys} for m, r in runs.items()}}))


if __name__ == "__main__":
    main()
