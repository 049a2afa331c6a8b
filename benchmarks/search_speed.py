"""Search speed on ResNet-56 from the published weights (real CIFAR-10 validation images).

    python benchmarks/search_speed.py                      # whole search to target 0.45
    python benchmarks/search_speed.py --max_steps=5 --modes=sliced,cache,nocache

Prints a table: warm-up (tracing) time, seconds per step, candidates per step, total
search time, and the retrace count after warm-up (must be 0). Modes: `sliced` (the
default of ekg-search) runs each sub-network at its real width and evaluates each
candidate from the first network segment its gate changes (prefix cache); `cache`
is the same on the masked full-width network; `nocache` runs the whole masked
network per candidate (still one compiled call per candidate for the whole
validation set); `sliced_nocache` likewise. The reference needs ~18.5 s/step, 77 steps, ~1,426 s for its loop on
this machine (spec section 9). Skips the adaptation pass (its cost is not the search's).
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


def run(mode: str, max_steps: int, target: float) -> dict:
    import tensorflow as tf
    from ekg_tf.data import normalize, reference_split_indices
    from ekg_tf.data.sources import load_npz
    from ekg_tf.models import build_model
    from ekg_tf.search.evaluator import SubnetEvaluator
    from ekg_tf.search.search import EKGSearch, SearchSettings
    from ekg_tf.search.sliced import SlicedSubnetEvaluator
    from ekg_tf.weights import load_weights

    tf.get_logger().setLevel("ERROR")
    train = load_npz(os.path.join(SHARED, "data", "cifar10", "cifar10_train.npz"))
    idx = reference_split_indices(train.y, 32, from_end=True)
    idx = idx[np.random.default_rng(0).permutation(len(idx))]
    x = normalize(train.x[idx], "cifar10").numpy()
    model = build_model("resnet56", 10)
    load_weights(model, os.path.join(SHARED, "reference", "res56_cifar10.npz"))
    cls = SlicedSubnetEvaluator if mode.startswith("sliced") else SubnetEvaluator
    ev = cls(model, x, train.y[idx], 256, cache_prefix=not mode.endswith("nocache"))
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
    cands = [e["candidates"] for e in result.history[1:]]
    return {"mode": mode, "warmup_s": timed_warm_up.seconds, "steps": result.steps,
            "s_per_step": float(np.mean(times)) if times else float("nan"),
            "median_s_per_step": float(np.median(times)) if times else float("nan"),
            "candidates_per_step": float(np.mean(cands)) if cands else 0.0,
            "s_per_candidate": float(np.sum(times) / max(np.sum(cands), 1)),
            "search_s": float(np.sum(times)), "total_s": total,
            "macs_ratio": result.macs_ratio, "retraces_after_warmup":
                result.retraces_after_warmup}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max_steps", type=int, default=1000)
    p.add_argument("--target", type=float, default=0.45)
    p.add_argument("--modes", default="sliced")
    args = p.parse_args()
    if not os.path.exists(os.path.join(SHARED, "reference", "res56_cifar10.npz")):
        sys.exit(f"needs {SHARED}/reference/res56_cifar10.npz and {SHARED}/data/cifar10")
    rows = [run(m, args.max_steps, args.target) for m in args.modes.split(",")]
    cols = ["mode", "warmup_s", "steps", "s_per_step", "median_s_per_step",
            "candidates_per_step", "s_per_candidate", "search_s", "macs_ratio",
            "retraces_after_warmup"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                                for c in cols) + " |")
    print("| reference (spec s.9) | - | 77 | 18.5 | 18.2 | 11-18 | ~1.2 | 1426 | 0.449 | - |")


if __name__ == "__main__":
    main()
