"""Steady-state fine-tuning throughput of the *reference* implementation on our pruned widths.

    python benchmarks/reference_throughput.py --reference=/path/to/EKG \
        --search_workdir=runs/r56_045 [--modes=ekg,plain] [--xla=off,on] \
        [--warmup_steps=20 --steps=30]

`--reference` is a checkout of https://github.com/sseung0703/EKG (read, never copied or
vendored). Each (mode, XLA) measurement runs in its own subprocess with
`TF_USE_LEGACY_KERAS=1` (`tf.keras` is then tf-keras, the Keras 2 API the reference was
written for; our Keras 3 is untouched) and runs the reference's own code:

- its `train.py` arguments (imported with `--Knowledge` for mode ekg; its defaults: batch
  128, 5 teachers, SGD + Nesterov, lr 0.05, weight decay 1e-4; `train_cifar.py` passes lr
  0.01 and weight decay 5e-4: the same work per step);
- its CIFAR-10 input pipeline (`dataloader/CIFAR.build_dataset_providers`: the whole
  training split cached, shuffle, batch, two jittered views per image for mode ekg,
  the memory-bank row of each image, prefetch) under its
  `MirroredStrategy(HierarchicalCopyAllReduce)`, on the one CPU device;
- its model (`nets/ResNet.Model`, weights given through its `utils.assign_param`) and its
  train step (`op_utils.Optimizer`: one forward of the `[2B, 32, 32, 3]` reshape of both
  views, the teacher selection and KD + CE loss, gradients halved, weight decay added to the
  gradients), timed like `benchmarks/finetune_throughput.py`: pull to pull of
  `train.py`'s own loop (`for step, data in enumerate(datasets['train'])`, the learning
  rate set, `train_step(*data)`), input included; images/s counts images (not views).

Our widths: the slimmed network is built from the published ResNet-56
(`../shared/reference/res56_cifar10.npz`, the reference's own parameter names) cut to the
kept channels of our search (`search/subnet.json`): our group `conv` is the reference's
stem + stage-0 residual stream (`conv`, `bn`, every `BasicBlock0.j/conv2`, `bn2`),
`block{i}_0_conv3` the stage-i stream (`BasicBlock{i}.0/conv3`, `bn3`, every
`BasicBlock{i}.j/conv2`, `bn2`), `block{i}_{j}_conv1` the reference's own gate of
`BasicBlock{i}.{j}/conv1`, `bn1`. Every kernel keeps its kept input and output channels and
is rescaled to its full norm, as the reference's `prune_utils.get_pruned_network` does. The
memory bank is our search's (`memory_bank/`: `[N, classes, teachers]`, teacher 0 the
lowest-loss one, the reference's `CIFAR10_knowledge.npy` layout), written as that `.npy`
in float32 into the run directory. The MACs ratio the reference's own
`utils.check_complexity` gives for these widths is printed next to our search's.

Patches (nothing else of the reference is changed):
- data: this machine is offline, so `tensorflow.keras.datasets.cifar10.load_data` (the
  reference's only data source) returns the arrays of `../shared/data/cifar10` (training
  split; the lossless first 1,000 test images), labels `[N, 1]` as Keras returns them;
- XLA: `train.py` always compiles (`--compile` is `store_true` with default True); `--xla=off`
  sets `args.compile = False` after its arguments are parsed (the reference's own switch);
- devices: `train.py`'s GPU selection is not run; the strategy is built as it builds it,
  over `/cpu:0`; its `save_code_and_augments`, summaries and evaluation are not run;
- the pretrained weights are handed to `utils.assign_param` as arrays instead of being
  unpickled from `slimmed_params.pkl`.
TF 2.21 itself forced no change: `tf.optimizers.SGD` is tf-keras' current SGD (TF 2.7/2.8
had the legacy optimizer: the same update).

Run it on a quiet machine. Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune_throughput import PROFILE_STEPS, print_top_ops, profile_top_ops  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
CIFAR = os.path.join(SHARED, "data", "cifar10")


def stream_group(stage: int) -> str:
    """Our group name of stage `stage`'s residual stream (the reference's group_mask)."""
    return "conv" if stage == 0 else f"block{stage}_0_conv3"


def block_index(block: str) -> tuple:
    """`BasicBlock1.3` -> (1, 3): stage and block of the reference's names."""
    stage, block = block[len("BasicBlock"):].split(".")
    return int(stage), int(block)


def slimmed_params(published: dict, groups: dict) -> dict:
    """The reference's ResNet (CIFAR) parameters cut to our kept channels.

    `published`: reference names -> arrays (`BasicBlock0.0/conv1/kernel:0`, ...); `groups`:
    our subnet.json groups. Returns the same names with the kept slices; kernels are
    rescaled to the norm of the full kernel (`prune_utils.get_pruned_network`)."""
    kept = {name: np.asarray(g["kept_indices"], np.int64) for name, g in groups.items()}
    layer_io = {"conv": (None, kept["conv"]), "bn": (None, kept["conv"])}
    blocks = sorted({block_index(k.split("/")[0]) for k in published
                     if k.startswith("BasicBlock")})
    for i, j in blocks:
        block = f"BasicBlock{i}.{j}"
        stream_in = kept[stream_group(i - 1 if j == 0 and i > 0 else i)]
        stream_out, mid = kept[stream_group(i)], kept[f"block{i}_{j}_conv1"]
        layer_io[f"{block}/conv1"] = (stream_in, mid)
        layer_io[f"{block}/bn1"] = (None, mid)
        layer_io[f"{block}/conv2"] = (mid, stream_out)
        layer_io[f"{block}/bn2"] = (None, stream_out)
        if f"{block}/conv3/kernel:0" in published:
            layer_io[f"{block}/conv3"] = (stream_in, stream_out)
            layer_io[f"{block}/bn3"] = (None, stream_out)
    last = kept[stream_group(blocks[-1][0])]
    layer_io["fc"] = (last, None)

    out = {}
    for name, value in published.items():
        layer, var = name.rsplit("/", 1)
        cin, cout = layer_io[layer]
        x = np.asarray(value, np.float32)
        if var == "kernel:0" and cin is not None:
            x = np.take(x, cin, axis=-2)
        if cout is not None:
            x = np.take(x, cout, axis=-1)
        if var == "kernel:0":
            x = x * (np.linalg.norm(value) / max(np.linalg.norm(x), 1e-12))
        out[name] = x.astype(np.float32)
    return out


def knowledge(memory_bank: str) -> np.ndarray:
    """Our memory bank's dense logits [N, classes, teachers] as float32 (shards in order)."""
    meta = json.load(open(os.path.join(memory_bank, "meta.json")))
    if meta.get("topk"):
        raise SystemExit(f"{memory_bank}: a top-k memory bank; the reference reads dense logits")
    shards = [np.load(os.path.join(memory_bank, f"logits-{s:05d}.npy"), allow_pickle=False)
              for s in range(meta["num_shards"])]
    return np.concatenate(shards).astype(np.float32)


# --------------------------------------------------------------- the subprocess (tf-keras)

def offline_cifar10():
    """`tensorflow.keras.datasets.cifar10.load_data` from ../shared (this machine is offline)."""
    import types
    train = np.load(os.path.join(CIFAR, "cifar10_train.npz"), allow_pickle=False)
    test = np.load(os.path.join(CIFAR, "cifar10_test1000_lossless.npz"), allow_pickle=False)
    module = types.ModuleType("tensorflow.keras.datasets.cifar10")
    module.load_data = lambda: ((train["x"], train["y"].reshape(-1, 1).astype(np.int64)),
                                (test["x"], test["y"].reshape(-1, 1).astype(np.int64)))
    sys.modules[module.__name__] = module


def reference_args(reference: str, run_dir: str, mode: str, xla: bool):
    """train.py's own parsed arguments (its parser runs at import; its main does not)."""
    argv = ["train.py", "--train_path", run_dir,
            "--trained_param", os.path.join(run_dir, "slimmed_params.pkl")]
    if mode == "ekg":
        argv.append("--Knowledge")
    sys.argv, saved = argv, sys.argv
    try:
        import train  # noqa: F401  (the reference's train.py, on sys.path)
    finally:
        sys.argv = saved
    train.args.compile = xla
    return train.args


def child(opts):
    sys.path.insert(0, os.path.abspath(opts.reference))
    offline_cifar10()
    import tensorflow as tf
    if not tf.keras.__name__.startswith("tf_keras"):
        raise SystemExit(f"tf.keras is {tf.keras.__name__}, not tf-keras: set TF_USE_LEGACY_KERAS=1")
    import op_utils
    import utils
    from dataloader import CIFAR as reference_data

    run_dir = opts.run_dir
    args = reference_args(opts.reference, run_dir, opts.mode, opts.xla == "on")
    groups = json.load(open(os.path.join(opts.search_workdir, "search", "subnet.json")))["groups"]
    published = dict(np.load(opts.published, allow_pickle=False))
    if opts.mode == "ekg":
        np.save(os.path.join(run_dir, "CIFAR10_knowledge.npy"),
                knowledge(os.path.join(opts.search_workdir, "memory_bank")))

    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0"], cross_device_ops=tf.distribute.HierarchicalCopyAllReduce())
    with strategy.scope():
        datasets = reference_data.build_dataset_providers(args, strategy)
        full = utils.load_model(args, args.num_classes)
        utils.assign_param(full, published)
        _, full_flops = utils.check_complexity(full, args)
        model = utils.load_model(args, args.num_classes)
        utils.assign_param(model, slimmed_params(published, groups))
        params, flops = utils.check_complexity(model, args)
        train_step, train_loss, train_accuracy, optimizer = op_utils.Optimizer(args, model,
                                                                               strategy)
        total = opts.warmup_steps + opts.steps
        profile_dir = os.path.join(run_dir, "profile")
        times, shapes = [time.perf_counter()], None
        for step, data in enumerate(datasets["train"]):  # train.py's loop body
            epoch = step // args.iter_len["train"]
            optimizer.learning_rate = utils.scheduler(args.learning_rate, epoch,
                                                      args.decay_points, args.decay_rate)
            step += 1
            train_step(*data)
            times.append(time.perf_counter())
            shapes = shapes or [list(d.shape) for d in data]
            if opts.profile and step == total:  # as finetune_throughput: 3 more steps traced
                tf.profiler.experimental.start(profile_dir)
            if step == total + (PROFILE_STEPS if opts.profile else 0):
                break
        if opts.profile:
            tf.profiler.experimental.stop()
        loss = float(train_loss.result()) * len(args.gpu_id)
    a, b = opts.warmup_steps, total
    steps = np.diff(times[a:b + 1])
    views = shapes[0][1] if opts.mode == "ekg" else 1
    return {"mode": opts.mode, "xla": opts.xla, "seconds_per_step": float(steps.mean()),
            "median_seconds_per_step": float(np.median(steps)),
            "images_per_second": args.batch_size / float(steps.mean()),
            "batch": args.batch_size, "views": views,
            "student_batch": args.batch_size * views,
            "teachers": shapes[2][-1] if opts.mode == "ekg" else 0,
            "batch_shapes": shapes, "mean_loss": loss,
            "train_accuracy": float(train_accuracy.result()),
            "macs_ratio_reference_count": float(flops / full_flops),
            "params": float(params), "first_step_seconds": times[1] - times[0],
            "top_ops": profile_top_ops(profile_dir) if opts.profile else [],
            "widths": [model.Layers[k].kernel.shape[-1] for k in model.Layers if "conv" in k]}


# --------------------------------------------------------------- the parent

def run_one(opts, mode, xla):
    run_dir = tempfile.mkdtemp(prefix=f"ref_{mode}_xla{xla}_", dir=opts.out)
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--reference", opts.reference,
           "--search_workdir", opts.search_workdir, "--published", opts.published,
           "--mode", mode, "--xla", xla, "--run_dir", run_dir,
           "--warmup_steps", str(opts.warmup_steps), "--steps", str(opts.steps)]
    cmd += ["--profile"] if opts.profile else []
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    row = json.loads(out.strip().splitlines()[-1])
    row["run_dir"] = run_dir
    print(f"# reference {mode} xla={xla}: {row['seconds_per_step']:.3f} s/step",
          file=sys.stderr, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="a checkout of sseung0703/EKG")
    ap.add_argument("--search_workdir", required=True,
                    help="workdir of ekg-search (search/subnet.json + memory_bank/), read only")
    ap.add_argument("--published", default=os.path.join(SHARED, "reference",
                                                        "res56_cifar10.npz"))
    ap.add_argument("--out", default="/tmp/ekg_reference_throughput")
    ap.add_argument("--modes", default="ekg")
    ap.add_argument("--xla", default="off", help="off, on or off,on")
    ap.add_argument("--warmup_steps", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile", action="store_true",
                    help="trace 3 more steps with tf.profiler; print the ops with most self time")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--run_dir", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts._child:
        print(json.dumps(child(opts)))
        return
    for path in ("op_utils.py", "train.py", "nets/ResNet.py", "dataloader/CIFAR.py"):
        if not os.path.isfile(os.path.join(opts.reference, path)):
            raise SystemExit(f"--reference={opts.reference}: no {path}; give a checkout of "
                             f"https://github.com/sseung0703/EKG")
    arch = json.load(open(os.path.join(opts.search_workdir, "search", "subnet.json")))["arch"]
    if arch != "resnet56":
        raise SystemExit(f"{opts.search_workdir}: a {arch} search; the reference's weights "
                         f"here are its ResNet-56 ({opts.published}): give a resnet56 search")
    if set(opts.xla.split(",")) - {"off", "on"} or set(opts.modes.split(",")) - {"ekg", "plain"}:
        raise SystemExit("--xla takes off, on or off,on; --modes ekg, plain or ekg,plain")
    os.makedirs(opts.out, exist_ok=True)
    rows = [run_one(opts, mode, xla) for xla in opts.xla.split(",")
            for mode in opts.modes.split(",")]
    ours = json.load(open(os.path.join(opts.search_workdir, "search", "result.json")))
    print(f"\nreference train step on our widths (MACs ratio: reference count "
          f"{rows[0]['macs_ratio_reference_count']:.4f}, our search {ours['macs_ratio']:.4f})")
    print(f"{'mode':<7}{'XLA':<5}{'s/step':>8}{'median':>8}{'img/s':>8}{'student batch':>15}"
          f"{'teachers':>9}{'first step s':>13}")
    for r in rows:
        print(f"{r['mode']:<7}{r['xla']:<5}{r['seconds_per_step']:>8.3f}"
              f"{r['median_seconds_per_step']:>8.3f}{r['images_per_second']:>8.1f}"
              f"{r['student_batch']:>15}{r['teachers']:>9}{r['first_step_seconds']:>13.1f}")
    for r in rows:
        print_top_ops(f"reference {r['mode']} XLA {r['xla']}", r["top_ops"])
    print(json.dumps({"reference": os.path.abspath(opts.reference),
                      "our_macs_ratio": ours["macs_ratio"], "rows": rows}))


if __name__ == "__main__":
    main()
