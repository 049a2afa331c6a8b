"""Prediction error of the latency model on real exported sub-networks of ResNet-56.

    python benchmarks/latency_model.py --runtime=tflite --round_to=8 --subnets=24
    python benchmarks/latency_model.py --runtime=onnxruntime --round_to=8 --subnets=24
    python benchmarks/latency_model.py --runtime=tflite --build_only   # just the table

Builds (or reads from the cache) the block-latency table of the published ResNet-56 for
`--runtime` at `--threads` and `--batch` (ekg_tf.latency; timed on this machine), draws
`--subnets` random sub-networks (every group at a uniformly drawn width of its aligned
widths, random channel ranks; seeded), exports each one as ekg-export does (slimmed, BN
folded; TFLite from the SavedModel, ONNX with tf2onnx) and times each one paired with
the unpruned network in alternating rounds (medians), one session alive at a time
(`runtimes.time_alone`: an idle onnxruntime session's spinning threads slow the other).
Prints, per sub-network, its MACs ratio, predicted and measured latency and the
relative error, and the predicted against the measured ratio to the unpruned network
(what a latency target reads), then the median absolute errors and a JSON line. Run it
under the exclusive CPU lock: the timings are the evidence.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared")


def random_spec(gated, rng, round_to: int):
    """A random sub-network: each group at a uniformly drawn aligned width, random ranks."""
    from ekg_tf.graph.gates import aligned_widths
    from ekg_tf.subnet import SubnetSpec
    gated.set_round_to(round_to)
    for g in gated.gate_groups:
        g.rank = rng.permutation(g.channels)
        g.rate = float(rng.choice(aligned_widths(g.channels, round_to))) / g.channels
    return SubnetSpec.from_model(gated)


def export_file(runtime, folded, workdir: str) -> str:
    """The model file ekg-export writes for `runtime` (TFLite from the SavedModel, ONNX)."""
    from ekg_tf.latency.runtimes import edge_saved_model
    from ekg_tf.export import onnx_export, tflite
    if runtime.name == "tflite":
        edge = edge_saved_model(folded, os.path.join(workdir, "edge"))
        path = os.path.join(workdir, "model.tflite")
        with open(path, "wb") as f:
            f.write(tflite.convert(edge, "none"))
        return path
    path = os.path.join(workdir, "model.onnx")
    onnx_export.convert(folded, path)
    return path


def exported_session(runtime, path: str):
    """The runtime's session of an exported file, as ekg-export verifies it."""
    from ekg_tf.export import onnx_export, tflite
    if runtime.name == "tflite":
        return tflite.TFLiteRunner(path, runtime.threads)
    return onnx_export.OnnxRunner(path, runtime.threads)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=os.path.join(SHARED, "reference", "res56_cifar10.npz"))
    p.add_argument("--runtime", default="tflite")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--round_to", type=int, default=8)
    p.add_argument("--subnets", type=int, default=24)
    p.add_argument("--runs", type=int, default=30, help="timed runs per network")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache_dir", default="")
    p.add_argument("--build_only", action="store_true")
    p.add_argument("--subnets_from", default="",
                   help="comma-separated subnet.json files (search results) to time "
                        "instead of random sub-networks")
    args = p.parse_args()
    if not os.path.exists(args.weights):
        sys.exit(f"error: {args.weights} does not exist")

    import numpy as np
    from ekg_tf.flops import ComplexityCounter
    from ekg_tf.graph.gated import GatedModel
    from ekg_tf.latency import LatencyModel, Runtime
    from ekg_tf.latency.runtimes import time_alone
    from ekg_tf.models import build_model
    from ekg_tf.slimming import fold_batch_norm, slim_model
    from ekg_tf.utils.progress import ProgressBar
    from ekg_tf.weights import load_weights

    runtime = Runtime(args.runtime, args.threads)
    given = []  # search results to time (checked before any table work)
    if args.subnets_from:
        from ekg_tf.subnet import SubnetSpec
        for path in args.subnets_from.split(","):
            spec = SubnetSpec.from_json(path)
            if set(spec.round_to.values()) != {args.round_to}:
                sys.exit(f"error: {path} has round_to {sorted(set(spec.round_to.values()))}, "
                         f"not --round_to={args.round_to}")
            given.append(spec)
    gated = GatedModel(build_model("resnet56", 10))
    load_weights(gated, args.weights)
    t0 = time.time()
    model = LatencyModel(gated, runtime, args.batch, args.cache_dir or None,
                         round_to=args.round_to, build=False, log=print)
    todo = len(model.missing())
    if todo:
        bar = ProgressBar(todo, desc="latency table", unit="cell")
        model.build(bar)
        bar.close()
    retimed = model.retime_slow_cells()  # also a table built before re-timing existed
    build_s = time.time() - t0
    print(f"table {model.table.path}: {len(model.table)} cells, {todo} timed now "
          f"({build_s:.0f} s), {retimed} slow cells timed again; {len(model.segments)} blocks, "
          f"{len({s.signature for s in model.segments})} distinct; measured dense "
          f"{model.dense_ms:.3f} ms, narrowest {model.narrowest_ms:.3f} ms; block sums "
          f"{model.blocks_ms({}):.3f} ms dense; the line through {len(model._networks())} "
          f"measured networks: ms = {model.calibration()[0]:.3f} + "
          f"{model.calibration()[1]:.3f} x blocks")
    if args.build_only:
        print(json.dumps({"runtime": runtime.describe(), "batch": args.batch,
                          "table": model.table.path, "cells": len(model.table),
                          "timed_now": todo, "build_seconds": build_s,
                          "dense_ms": model.dense_ms}))
        return

    rng = np.random.default_rng(args.seed)
    counter = ComplexityCounter(gated.dependency, round_to=args.round_to)
    specs = given or [random_spec(gated, rng, args.round_to) for _ in range(args.subnets)]
    tmp = tempfile.mkdtemp(prefix="ekg-latmodel-")
    load_before = os.getloadavg()[0]
    try:
        bar = ProgressBar(len(specs) + 1, desc="exporting", unit="net")
        paths = []
        for i, spec in enumerate([specs[0].full_width()] + specs):  # the unpruned one first
            folded = fold_batch_norm(slim_model(gated, spec))
            workdir = os.path.join(tmp, str(i))
            os.makedirs(workdir)
            paths.append(export_file(runtime, folded, workdir))
            bar.update(1)
        bar.close()
        x = np.random.default_rng(1).normal(
            size=(args.batch, *gated.image_shape)).astype(np.float32)
        pairs = [time_alone([lambda: exported_session(runtime, paths[0]),
                             lambda p=path: exported_session(runtime, p)],
                            x, runs=args.runs, rounds=5) for path in paths[1:]]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for spec, (dense_ms, ms) in zip(specs, pairs):
        pred = model.predict_ms(spec.rates)
        rows.append({"macs_ratio": counter.macs_ratio(spec.rates), "predicted_ms": pred,
                     "measured_ms": ms, "error": pred / ms - 1.0, "dense_measured_ms": dense_ms,
                     "predicted_ratio": model.ratio(spec.rates), "measured_ratio": ms / dense_ms,
                     "ratio_error": model.ratio(spec.rates) / (ms / dense_ms) - 1.0})
    dense_measured = float(np.median([r["dense_measured_ms"] for r in rows]))
    errors = np.abs([r["error"] for r in rows])
    ratio_errors = np.abs([r["ratio_error"] for r in rows])
    print(f"{runtime.label}, batch {args.batch}, round_to {args.round_to}: dense measured "
          f"{dense_measured:.3f} ms (median of its {len(rows)} pairs; the table's dense "
          f"{model.dense_ms:.3f} ms); load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print("| # | MACs ratio | predicted ms | measured ms | error | predicted/dense | "
          "measured/dense | ratio error |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        print(f"| {i} | {r['macs_ratio']:.3f} | {r['predicted_ms']:.3f} | "
              f"{r['measured_ms']:.3f} | {100 * r['error']:+.1f}% | {r['predicted_ratio']:.3f} | "
              f"{r['measured_ratio']:.3f} | {100 * r['ratio_error']:+.1f}% |")
    print(f"median absolute error {100 * np.median(errors):.1f}% (max {100 * errors.max():.1f}%),"
          f" of the ratio to the unpruned network {100 * np.median(ratio_errors):.1f}% "
          f"(max {100 * ratio_errors.max():.1f}%) over {len(rows)} sub-networks")
    print(json.dumps({"runtime": runtime.describe(), "batch": args.batch,
                      "round_to": args.round_to, "subnets": len(rows),
                      "median_abs_error": float(np.median(errors)),
                      "max_abs_error": float(errors.max()),
                      "median_abs_ratio_error": float(np.median(ratio_errors)),
                      "max_abs_ratio_error": float(ratio_errors.max()),
                      "dense_measured_ms": dense_measured, "dense_table_ms": model.dense_ms,
                      "load_average": [load_before, os.getloadavg()[0]], "rows": rows}))


if __name__ == "__main__":
    main()
