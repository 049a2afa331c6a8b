"""What aligned widths allow on ResNet-56 at 0.45 of its MACs: hand-made aligned sub-networks.

    python benchmarks/aligned_space.py [--weights=W/search/weights.weights.h5]

For `round_to` 8 and 16: the MACs ratio of the narrowest aligned sub-network that keeps
every residual stream whole (every block-internal group at `round_to`), and the test top-1
(BN batch statistics, as the search's "before fine-tuning", on the 1,000 lossless test
images) of a few aligned sub-networks with L1-norm channel ranks. The point: which MACs a
`round_to` can reach without narrowing a residual stream, and what accuracy such widths
leave before fine-tuning, independent of the search's choices. `--weights`: the search's
adapted weights (default: the published weights). Prints a table and a JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared")


def stage_of(group) -> int:
    """0, 1, 2 from the group's full width (16/32/64 in a CIFAR ResNet)."""
    return {16: 0, 32: 1, 64: 2}[group.channels]


def designs(round_to: int) -> dict:
    """{label: f(group) -> width}: aligned sub-networks; streams (uses > 1) kept whole unless
    the label says otherwise."""
    r = round_to

    def inner(widths):  # block-internal width per stage, streams whole
        return lambda g: g.channels if g.uses > 1 else max(r, min(g.channels, widths[stage_of(g)]))

    out = {f"all internals at {r} (the narrowest with whole streams)": inner((r, r, r))}
    if r < 16:
        out["stage 0 whole; stage 1-2 internals at 16"] = inner((16, 16, 16))
    out.update({
        "stage 0-1 whole; stage 2 internals at 16": inner((16, 32, 16)),
        "stage 0 whole; stage 1 internals 16, stage 2 internals 32": inner((16, 16, 32)),
    })
    if r <= 8:
        out["stage 0 internals 8, stage 1 internals 16, stage 2 whole"] = inner((8, 16, 64))
        out["stage 0 internals 8, stage 1 internals 8, stage 2 internals 48"] = inner((8, 8, 48))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=os.path.join(SHARED, "reference", "res56_cifar10.npz"))
    p.add_argument("--images", default=os.path.join(SHARED, "data", "cifar10",
                                                     "cifar10_test1000_lossless.npz"))
    p.add_argument("--round_to", default="8,16")
    args = p.parse_args()
    for path in (args.weights, args.images):
        if not os.path.exists(path):
            sys.exit(f"error: {path} does not exist")

    import numpy as np
    from ekg_tf.data import normalize
    from ekg_tf.flops import ComplexityCounter
    from ekg_tf.graph.gated import GatedModel
    from ekg_tf.models import build_model
    from ekg_tf.subnet_search import evaluator as ev
    from ekg_tf.subnet_search.scoring import l1_filter_scores
    from ekg_tf.weights import load_weights

    gated = GatedModel(build_model("resnet56", 10))
    load_weights(gated, args.weights)
    scores = l1_filter_scores(gated)
    for g in gated.gate_groups:
        g.set_rank_from_score(scores[g.name])
    test = np.load(args.images)
    order = np.random.default_rng(0).permutation(len(test["y"]))  # mixed BN batches
    x, y = normalize(test["x"][order], "cifar10").numpy(), test["y"][order]

    rows = []
    for r in (int(v) for v in args.round_to.split(",")):
        gated.set_round_to(r)
        counter = ComplexityCounter(gated)
        for label, width_of in designs(r).items():
            for g in gated.gate_groups:
                g.rate = width_of(g) / g.channels
            macs = counter.macs_ratio({g.name: g.rate for g in gated.gate_groups})
            top1 = ev.top1(ev.batch_logits(gated, x, 250, True), y)
            rows.append({"round_to": r, "design": label, "macs_ratio": round(float(macs), 4),
                         "top1_bn_batch_stats": round(float(top1), 4)})
            print(f"| {r} | {label} | {macs:.3f} | {100 * top1:.1f}% |", flush=True)
    print(json.dumps({"weights": args.weights, "rows": rows}))


if __name__ == "__main__":
    main()
