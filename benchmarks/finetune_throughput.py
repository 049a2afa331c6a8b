"""Steady-state fine-tuning throughput of the published ResNet-56 searched to 0.45 (real data).

    python benchmarks/finetune_throughput.py --search_workdir=runs/r56_045 \
        --before=/path/to/a/checkout/of/the/old/code --profile

Each measurement is one real `ekg_tf.finetune.runner.run_finetune` (the `ekg-finetune`
job: the whole CIFAR-10 training split, its input pipeline with two jittered views and
the memory-bank lookup for mode ekg, the default strategy, batch 128, the reference
CIFAR schedule) in a fresh workdir `<out>/<label>/<mode>_<precision>/` that links to the
search's `search/` and `memory_bank/` (read only). It runs `--warmup_steps` + `--steps`
(+ the profiled steps) steps; the time of every step is taken where the training loop
pulls its next batch (the step of a CPU is synchronous: pull to pull is one step, input
included). s/step = the mean over the `--steps` steps after warm-up; images/s counts
images (not views). `--profile` traces 3 more steady-state steps with `tf.profiler`
into `<run>/profile/` and prints the ops with the most self time.

The loss trajectory is read back from the run's TensorBoard scalars (`loss`, the mean
over each `train.log_every_steps` = 10 steps) and test top-1 on the lossless first
1,000 test images after the run is reported.

`--code=DIR` imports `ekg_tf` from DIR instead of this checkout (another version of the
code: it must have `run_finetune(config, workdir, strategy=...)`); `--before=DIR` runs
the whole measurement with `--code=DIR` first (in a subprocess) and then with this
checkout, back to back, and prints both tables with the loss trajectories compared
(`--loss_rtol`). Precisions the code has no `train.precision` for are skipped.
Run it on a quiet machine (nothing else busy: the timings are the result). Prints tables and, last,
one JSON line.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")


def make_config(args, mode, precision):
    from ekg_tf.config import reference_cifar_config
    config = reference_cifar_config("resnet56", "cifar10")
    config.model.init = os.path.join(SHARED, "reference", "res56_cifar10.npz")
    config.data.train_path = os.path.join(SHARED, "data", "cifar10", "cifar10_train.npz")
    config.data.test_path = os.path.join(SHARED, "data", "cifar10",
                                         "cifar10_test1000_lossless.npz")
    config.seed = args.seed
    config.finetune.mode = mode
    config.finetune.steps = args.warmup_steps + args.steps + (PROFILE_STEPS + 1
                                                              if args.profile else 0)
    config.train.log_every_steps = args.log_every
    config.train.checkpoint_every_steps = 100_000
    if "precision" in config.train:
        config.train.precision = precision
    elif precision != "float32":
        return None  # this version of the code has no mixed precision
    return config


PROFILE_STEPS = 3


class TimedSteps:
    """Wraps the strategy's distributed training dataset: the time of every batch pull, and
    a tf.profiler trace of steps [profile_at, profile_at + PROFILE_STEPS)."""

    def __init__(self, strategy, profile_at=None, profile_dir=None):
        self.times = []
        self.profile_at, self.profile_dir = profile_at, profile_dir
        self._make = strategy.distribute_datasets_from_function
        strategy.distribute_datasets_from_function = self.distribute

    def distribute(self, fn, *a, **kw):
        dataset = self._make(fn, *a, **kw)
        outer = self

        class Timed:
            def __iter__(self):
                it = iter(dataset)
                while True:
                    outer.tick()
                    try:
                        yield next(it)
                    except StopIteration:
                        return
        return Timed()

    def tick(self):
        import tensorflow as tf
        self.times.append(time.perf_counter())
        n = len(self.times) - 1  # steps finished before this pull
        if self.profile_at is not None:
            if n == self.profile_at:
                tf.profiler.experimental.start(self.profile_dir)
            elif n == self.profile_at + PROFILE_STEPS:
                tf.profiler.experimental.stop()


# The event of a compiled (jit_compile) function's run on a CPU; inside it, HLO fusions.
XLA_EXECUTABLE = "CpuExecutable::ExecuteAsyncOnStream"


def profile_top_ops(profile_dir, top=12):
    """(op type, self ms per step, share) of the traced steps, by total self time.

    Reads the xplane trace: TF op events on the host threads (`name:Type`), tf.data
    events and XLA-compiled functions (the BN kernel; their whole run, as one row); self
    time = duration minus that of events nested inside it on its thread."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    paths = glob.glob(os.path.join(profile_dir, "plugins", "profile", "*", "*.xplane.pb"))
    if not paths:
        return []
    space = xplane_pb2.XSpace()
    with open(sorted(paths)[-1], "rb") as f:
        space.ParseFromString(f.read())
    totals = {}
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            events = sorted(((e.offset_ps, e.offset_ps + e.duration_ps, names[e.metadata_id])
                             for e in line.events), key=lambda e: (e[0], -e[1]))
            stack = []  # [end, name, child time]
            def close(upto):
                while stack and stack[-1][0] <= upto:
                    end, name, child, dur = stack.pop()
                    key = _op_key(name)
                    if key and line.name.startswith("tf_data"):
                        key = "(input pipeline) " + key
                    if name == XLA_EXECUTABLE:  # its HLO events are not TF ops: all of it
                        key, child = "(XLA) compiled clusters", 0
                    if key:
                        totals[key] = totals.get(key, 0) + dur - child
                    if stack:
                        stack[-1][2] += dur
            for start, end, name in events:
                close(start)
                stack.append([end, name, 0, end - start])
            close(float("inf"))
    all_ps = sum(totals.values()) or 1
    rows = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [(k, v / 1e9 / PROFILE_STEPS, v / all_ps) for k, v in rows]


def _op_key(name):
    """The op type of a TF op event (`scope/op:Type` -> Type); None for the executor's and
    the runtime's own events (`ExecutorState::Process`, `EagerExecute: fn`, ...)."""
    if ":" not in name or "::" in name or ": " in name:
        return None
    return name.rsplit(":", 1)[1] or None


def loss_trajectory(run_dir):
    """[(step, loss)] of the run's TensorBoard scalar `loss`."""
    import tensorflow as tf
    out = {}
    for path in glob.glob(os.path.join(run_dir, "finetune", "tensorboard", "finetune",
                                       "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                if v.tag == "loss":
                    out[int(event.step)] = float(tf.make_ndarray(v.tensor))
    return sorted(out.items())


def measure(args, mode, precision):
    import tensorflow as tf
    from ekg_tf.distribute import make_strategy
    from ekg_tf.finetune.runner import run_finetune

    config = make_config(args, mode, precision)
    if config is None:
        return None
    run_dir = os.path.join(args.out, args.label, f"{mode}_{precision}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run (an old one would resume)
    os.makedirs(run_dir)
    for name in ("search", "memory_bank"):
        os.symlink(os.path.abspath(os.path.join(args.search_workdir, name)),
                   os.path.join(run_dir, name))
    strategy = make_strategy(config.strategy)
    profile_dir = os.path.join(run_dir, "profile")
    timer = TimedSteps(strategy, args.warmup_steps + args.steps if args.profile else None,
                       profile_dir)
    t0 = time.time()
    result = run_finetune(config, run_dir, strategy=strategy, log=lambda m: None)
    wall = time.time() - t0
    t = timer.times
    a, b = args.warmup_steps, args.warmup_steps + args.steps
    if len(t) <= b:
        raise RuntimeError(f"only {len(t)} batches were pulled; expected more than {b}")
    per_step = (t[b] - t[a]) / args.steps
    steps = [t[i + 1] - t[i] for i in range(a, b)]
    batch = int(config.finetune.batch_size)
    tf.keras.backend.clear_session()
    return {"mode": mode, "precision": precision, "seconds_per_step": per_step,
            "median_seconds_per_step": sorted(steps)[len(steps) // 2],
            "images_per_second": batch / per_step, "batch": batch,
            "views": result["views"], "top1_after": result["top1"],
            "top1_before": result["top1_before"], "steps": result["steps"],
            "wall_seconds": wall, "loss": loss_trajectory(run_dir),
            "top_ops": profile_top_ops(profile_dir) if args.profile else []}


def run_all(args):
    rows = []
    for precision in args.precisions.split(","):
        for mode in args.modes.split(","):
            row = measure(args, mode, precision)
            if row is not None:
                rows.append(row)
                print(f"# {args.label} {mode} {precision}: {row['seconds_per_step']:.3f} s/step",
                      file=sys.stderr, flush=True)
    return rows


def print_table(label, rows):
    print(f"\n{label}: {'mode':<7}{'precision':<16}{'s/step':>8}{'median':>8}{'img/s':>8}"
          f"{'top1 after':>11}")
    for r in rows:
        print(f"{'':<{len(label) + 2}}{r['mode']:<7}{r['precision']:<16}"
              f"{r['seconds_per_step']:>8.3f}{r['median_seconds_per_step']:>8.3f}"
              f"{r['images_per_second']:>8.1f}{r['top1_after']:>11.4f}")
    for r in rows:
        print_top_ops(f"{label} {r['mode']} {r['precision']}", r["top_ops"])


def print_top_ops(title, top_ops):
    """The profile's top ops of one measurement (`profile_top_ops`), if it was profiled."""
    if top_ops:
        print(f"\n{title}: top ops (self ms per step, share)")
        for name, ms, share in top_ops:
            print(f"    {name:<36}{ms:>9.1f}{share:>8.1%}")


def compare_losses(before, after, rtol):
    """Per (mode, float32): the largest relative difference of the logged losses."""
    out = {}
    for b in before:
        for a in after:
            if (a["mode"], a["precision"]) == (b["mode"], b["precision"]):
                lb, la = dict(b["loss"]), dict(a["loss"])
                common = sorted(set(lb) & set(la))
                diffs = [abs(la[s] - lb[s]) / max(abs(lb[s]), 1e-12) for s in common]
                worst = max(diffs) if diffs else float("nan")
                out[f"{a['mode']}_{a['precision']}"] = {
                    "points": len(common), "max_rel_diff": worst, "within": worst <= rtol,
                    "before": [lb[s] for s in common], "after": [la[s] for s in common]}
    return out


def _argv_without(argv, names):
    """argv without the flags `names` (`--x=v` or `--x v`): the subprocess gets its own."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not a.startswith(tuple(n + "=" for n in names)):
            out.append(a)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--search_workdir", required=True,
                    help="workdir of ekg-search (search/ + memory_bank/), read only")
    ap.add_argument("--out", default="/tmp/ekg_finetune_throughput")
    ap.add_argument("--modes", default="ekg,plain")
    ap.add_argument("--precisions", default="float32,mixed_bfloat16")
    ap.add_argument("--warmup_steps", type=int, default=50)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--log_every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--code", default="", help="import ekg_tf from this directory")
    ap.add_argument("--label", default="")
    ap.add_argument("--before", default="", help="a checkout of the code to compare with")
    ap.add_argument("--loss_rtol", type=float, default=1e-3)
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.code or REPO))
    args.label = args.label or ("before" if args.code else "after")

    before = None
    if args.before:
        cmd = [sys.executable, os.path.abspath(__file__), "--code", args.before,
               "--label", "before"] + _argv_without(sys.argv[1:], ("--before", "--code",
                                                                    "--label"))
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        print(out.rsplit("\n", 2)[0])
        before = json.loads(out.strip().splitlines()[-1])["rows"]

    import ekg_tf
    print(f"# {args.label}: ekg_tf from {os.path.dirname(ekg_tf.__file__)}", file=sys.stderr)
    rows = run_all(args)
    print_table(args.label, rows)
    summary = {"label": args.label, "code": os.path.dirname(ekg_tf.__file__), "rows": rows}
    if before is not None:
        summary["before"] = before
        summary["loss_comparison"] = compare_losses(before, rows, args.loss_rtol)
        print(f"\nloss trajectory (TensorBoard 'loss', mean of each {args.log_every} steps), "
              f"after vs before, rtol {args.loss_rtol:g}:")
        for key, c in summary["loss_comparison"].items():
            print(f"  {key:<22}{c['points']:>4} points, max rel diff {c['max_rel_diff']:.2e} "
                  f"{'OK' if c['within'] else 'DIFFERENT'}")
        print(f"\n{'mode':<7}{'precision':<16}{'before s/step':>14}{'after s/step':>13}"
              f"{'speed-up':>9}{'before img/s':>13}{'after img/s':>12}")
        for r in rows:
            b = next((b for b in before if (b["mode"], b["precision"]) ==
                      (r["mode"], r["precision"])), None)
            bs = b["seconds_per_step"] if b else float("nan")
            bi = b["images_per_second"] if b else float("nan")
            print(f"{r['mode']:<7}{r['precision']:<16}{bs:>14.3f}{r['seconds_per_step']:>13.3f}"
                  f"{bs / r['seconds_per_step']:>8.2f}x{bi:>13.1f}{r['images_per_second']:>12.1f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
