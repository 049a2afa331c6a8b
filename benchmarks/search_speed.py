"""Search speed on ResNet-56 from the published weights (real CIFAR-10 validation images).

    python benchmarks/search_speed.py                      # whole search to target 0.45
    python benchmarks/search_speed.py --max_steps=5 --modes=sliced,masked,masked_nocache
    python benchmarks/search_speed.py --memory_bank --out=/tmp/search.json   # + memory bank
    python benchmarks/search_speed.py --compare=/tmp/before.json  # same channels as before?

With `--memory_bank` the 5-teacher memory bank of the searched sub-network is built over
the 50,000 training images (as ekg-search does) and timed. `--out` writes each mode's
result as JSON with the kept output channels of every conv/dense layer (keyed by layer
name); `--compare` reads such a file (of another version of the code, same modes) and
prints, per mode, whether the same steps were taken and the same channels kept in every
layer the two have in common.

Prints a table: warm-up (tracing) time, seconds per step, candidates per step, total
search time, and the retrace count after warm-up (must be 0). Modes name the
evaluator's forward: `sliced` (the default of ekg-search) runs each sub-network at its
real width and evaluates each candidate from the first layer its group touches
(prefix cache); `masked` is the same on the masked full-width network; a `_nocache`
suffix runs the whole network per candidate (still one compiled call per candidate
for the whole validation set). The reference needs ~18.5 s/step, 77 steps, ~1,426 s
for its loop on this machine (spec section 9). Skips the adaptation pass (its cost is
not the search's).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def kept_channels_per_layer(model) -> dict:
    """{layer name: kept output channel indices} of a gated clone's current sub-network."""
    from ekg_tf.slimming import layout_indices
    kept = {g.name: g.kept_indices() for g in model.gate_groups}
    dep = model.dependency
    return {node.name: [int(i) for i in layout_indices(dep.out_layout(node), kept)]
            for node in dep.graph.nodes if dep.rule(node).produces}


def time_memory_bank(model, train, history) -> float:
    """Seconds to build the 5-teacher memory bank over the whole training split."""
    from ekg_tf.data import normalize
    from ekg_tf.subnet_search.memory_bank import build_memory_bank, select_teachers
    entries = history[:-1]
    teachers = [entries[i] for i in select_teachers([e["loss"] for e in entries], 5)]
    n, bs = len(train), 256
    batches = ((normalize(train.x[i:i + bs], "cifar10").numpy(), train.y[i:i + bs],
                np.arange(i, min(i + bs, n))) for i in range(0, n, bs))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        build_memory_bank(model, teachers, batches, n, out)
        return time.time() - t0


def run(mode: str, max_steps: int, target: float, memory_bank: bool = False) -> dict:
    import tensorflow as tf
    from ekg_tf.data import normalize, reference_split_indices
    from ekg_tf.data.sources import load_npz
    from ekg_tf.graph.gated import GatedModel
    from ekg_tf.models import build_model
    from ekg_tf.subnet_search.evaluator import SubnetEvaluator
    from ekg_tf.subnet_search.search import EKGSearch, SearchSettings
    from ekg_tf.weights import load_weights

    tf.get_logger().setLevel("ERROR")
    train = load_npz(os.path.join(SHARED, "data", "cifar10", "cifar10_train.npz"))
    idx = reference_split_indices(train.y, 32, from_end=True)
    idx = idx[np.random.default_rng(0).permutation(len(idx))]
    x = normalize(train.x[idx], "cifar10").numpy()
    model = GatedModel(build_model("resnet56", 10))
    load_weights(model, os.path.join(SHARED, "reference", "res56_cifar10.npz"))
    ev = SubnetEvaluator(model, x, train.y[idx], 256, cache_prefix=not mode.endswith("nocache"),
                         forward=mode.split("_")[0])
    settings = SearchSettings(target_ratio=target, max_steps=max_steps)
    with tempfile.TemporaryDirectory() as tmp:
        search = EKGSearch(model, ev, settings, tmp, {"benchmark": mode})
        t0 = time.time()
        times = []
        last = [time.time()]

        def on_step(entry):
            times.append(time.time() - last[0])
            last[0] = time.time()

        # warm-up (tracing) happens inside run() before step 1: measure it separately
        orig = ev.warm_up

        def timed_warm_up(k):
            w0 = time.time()
            orig(k)
            timed_warm_up.seconds = time.time() - w0
            last[0] = time.time()
        ev.warm_up = timed_warm_up
        result = search.run(on_step=on_step)
        total = time.time() - t0
    kept = kept_channels_per_layer(model)
    bank_s = time_memory_bank(model, train, result.history) if memory_bank else float("nan")
    cands = [e["candidates"] for e in result.history[1:]]
    return {"mode": mode, "warmup_s": timed_warm_up.seconds, "steps": result.steps,
            "s_per_step": float(np.mean(times)) if times else float("nan"),
            "median_s_per_step": float(np.median(times)) if times else float("nan"),
            "candidates_per_step": float(np.mean(cands)) if cands else 0.0,
            "s_per_candidate": float(np.sum(times) / max(np.sum(cands), 1)),
            "search_s": float(np.sum(times)), "total_s": total,
            "macs_ratio": result.macs_ratio, "retraces_after_warmup":
                result.retraces_after_warmup, "memory_bank_s": bank_s,
            "chosen_groups": [e["group"] for e in result.history[1:]],
            "kept_channels": kept}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max_steps", type=int, default=1000)
    p.add_argument("--target", type=float, default=0.45)
    p.add_argument("--modes", default="sliced")
    p.add_argument("--memory_bank", action="store_true",
                   help="also build and time the 5-teacher memory bank of the result")
    p.add_argument("--out", default="", help="write the results (with kept channels) as JSON")
    p.add_argument("--compare", default="", help="an --out file to compare kept channels with")
    args = p.parse_args()
    if not os.path.exists(os.path.join(SHARED, "reference", "res56_cifar10.npz")):
        sys.exit(f"needs {SHARED}/reference/res56_cifar10.npz and {SHARED}/data/cifar10")
    rows = [run(m, args.max_steps, args.target, args.memory_bank)
            for m in args.modes.split(",")]
    if args.out:
        import json
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    cols = ["mode", "warmup_s", "steps", "s_per_step", "median_s_per_step",
            "candidates_per_step", "s_per_candidate", "search_s", "memory_bank_s",
            "macs_ratio", "retraces_after_warmup"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                                for c in cols) + " |")
    print("| reference (spec s.9) | - | 77 | 18.5 | 18.2 | 11-18 | ~1.2 | 1426 | 331-444 | 0.449 "
          "| - |")
    if args.compare:
        compare(rows, args.compare)


def compare(rows, path):
    """Per mode: steps, MACs ratio and kept channels against another run's --out file."""
    import json
    with open(path) as f:
        other = {r["mode"]: r for r in json.load(f)}
    for r in rows:
        o = other.get(r["mode"])
        if o is None:
            print(f"{r['mode']}: not in {path}")
            continue
        common = sorted(set(r["kept_channels"]) & set(o["kept_channels"]))
        differ = [n for n in common if r["kept_channels"][n] != o["kept_channels"][n]]
        print(f"{r['mode']} vs {path}: steps {r['steps']} vs {o['steps']}, MACs ratio "
              f"{r['macs_ratio']:.6f} vs {o['macs_ratio']:.6f}, same kept channels in "
              f"{len(common) - len(differ)} of {len(common)} layers"
              + (f"; differ: {differ}" if differ else ""))


if __name__ == "__main__":
    main()
