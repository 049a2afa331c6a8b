"""Latency of the dense vs the pruned ResNet-56 in Keras, TFLite (XNNPACK) and onnxruntime.

    python benchmarks/export_latency.py [--subnet=workdir/search/subnet.json] [--threads=2]

Without --subnet the pruned network is the deterministic stand-in of
`export.subnets.l1_uniform_subnet(model, 0.45)` (L1 ranks, residual streams kept,
uniform block-internal rate lowered until MACs ratio <= 0.45), not a search result.
All runtimes run the deployment graph (BN folded into the convs), float32, on the
same real CIFAR-10 images; latency = median (and min) wall time of --runs runs after
warm-up, dense and pruned measured in alternating blocks with one session alive at a
time (`ekg_tf.latency.runtimes.wall_times_alone`).
Prints a table (pruned/dense latency ratio next to the MACs ratio) and a JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=os.path.join(SHARED, "reference", "res56_cifar10.npz"))
    p.add_argument("--images", default=os.path.join(SHARED, "data", "cifar10",
                                                     "cifar10_test1000_lossless.npz"))
    p.add_argument("--subnet", default=None, help="SubnetSpec JSON (a real search result)")
    p.add_argument("--target", type=float, default=0.45)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--round_to", type=int, default=1,
                   help="kept widths of the stand-in sub-network (without --subnet)")
    p.add_argument("--batches", default="1,32")
    args = p.parse_args()
    for path in (args.weights, args.images):
        if not os.path.exists(path):
            sys.exit(f"error: {path} does not exist")

    import numpy as np
    import tensorflow as tf
    from ekg_tf.data import normalize
    from ekg_tf.flops import ComplexityCounter
    from ekg_tf.graph.gated import GatedModel
    from ekg_tf.models import build_model
    from ekg_tf.slimming import fold_batch_norm, slim_model
    from ekg_tf.subnet import SubnetSpec
    from ekg_tf.weights import load_weights
    from ekg_tf.export import onnx_export, tflite, verify
    from ekg_tf.export.subnets import l1_uniform_subnet
    from ekg_tf.latency import Runtime
    from ekg_tf.latency.model import ARTIFACTS, cached_predictions
    from ekg_tf.latency.runtimes import edge_saved_model, wall_times_alone

    model = GatedModel(build_model("resnet56", 10))
    load_weights(model, args.weights)
    dense = slim_model(model, name="resnet56_dense")
    if args.subnet:
        spec = SubnetSpec.from_json(args.subnet)
        source = args.subnet
    else:
        model.set_round_to(args.round_to)
        spec = l1_uniform_subnet(model, args.target)
        source = (f"l1_uniform_subnet(target={args.target}, round_to={args.round_to}) "
                  "(deterministic stand-in, not a search)")
    pruned = slim_model(model, spec, name="resnet56_pruned")
    counter = ComplexityCounter(model, round_to=spec.round_to)
    macs_ratio = counter.macs_ratio(spec.rates)
    with np.load(args.images) as f:
        x = normalize(f["x"][:64], "cifar10").numpy()
    batches = [int(b) for b in args.batches.split(",")]

    tmp = tempfile.mkdtemp(prefix="ekg-bench-")
    rows = []
    try:
        openers = {}  # per network and runtime: opens a session (one is alive at a time)
        for tag, net in (("dense", dense), ("pruned", pruned)):
            folded = fold_batch_norm(net)
            edge = edge_saved_model(folded, os.path.join(tmp, f"{tag}_edge"))
            tfl = os.path.join(tmp, f"{tag}.tflite")
            with open(tfl, "wb") as fh:
                fh.write(tflite.convert(edge, "none"))
            onx = os.path.join(tmp, f"{tag}.onnx")
            onnx_export.convert(folded, onx)
            keras_fn = verify.keras_predictor(folded)  # traced once, kept
            openers[tag] = {
                "keras": lambda fn=keras_fn: fn,
                Runtime("tflite", args.threads).label:
                    lambda p=tfl: tflite.TFLiteRunner(p, args.threads),
                Runtime("onnxruntime", args.threads).label:
                    lambda p=onx: onnx_export.OnnxRunner(p, args.threads),
            }
        for runtime in openers["dense"]:
            for b in batches:
                d, q = wall_times_alone([openers["dense"][runtime], openers["pruned"][runtime]],
                                        x[:b], args.runs)
                rows.append({"runtime": runtime, "batch": b,
                             "dense_ms": float(np.median(d)), "pruned_ms": float(np.median(q)),
                             "dense_min_ms": float(np.min(d)), "pruned_min_ms": float(np.min(q)),
                             "latency_ratio": float(np.median(q) / np.median(d)),
                             "min_ratio": float(np.min(q) / np.min(d)),
                             "macs_ratio": macs_ratio})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # the latency model's predictions, where a table is cached (benchmarks/latency_model.py)
    predicted = cached_predictions(model, spec, args.threads, batches)
    for r in rows:
        for name, artifact in ARTIFACTS.items():
            p = predicted.get(artifact, {}).get(f"batch{r['batch']}")
            if p and r["runtime"] == Runtime(name, args.threads).label:
                r.update(predicted_ms=p["predicted_ms"], predicted_ratio=p["predicted_ratio"])

    print(f"sub-network: {source}")
    print(f"MACs: dense {counter.full.macs / 1e6:.1f} M, pruned "
          f"{counter.count(spec.rates).macs / 1e6:.1f} M (ratio {macs_ratio:.3f}); "
          f"TF intra-op threads: default (cpu_count={os.cpu_count()}); median of {args.runs} runs")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (other processes skew latency)")
    print("| runtime | batch | dense ms (median) | pruned ms (median) | ratio (median) | "
          "dense ms (min) | pruned ms (min) | ratio (min) | MACs ratio | ratio / MACs ratio | "
          "predicted pruned ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pred = f"{r['predicted_ms']:.2f}" if "predicted_ms" in r else "-"
        print(f"| {r['runtime']} | {r['batch']} | {r['dense_ms']:.2f} | {r['pruned_ms']:.2f} | "
              f"{r['latency_ratio']:.3f} | {r['dense_min_ms']:.2f} | {r['pruned_min_ms']:.2f} | "
              f"{r['min_ratio']:.3f} | {r['macs_ratio']:.3f} | "
              f"{r['latency_ratio'] / r['macs_ratio']:.2f} | {pred} |")
    print(f"round_to {sorted(set(spec.round_to.values()))}; onnxruntime settings: "
          f"{Runtime('onnxruntime', args.threads).describe()}")
    print(json.dumps({"subnet": source, "macs_ratio": macs_ratio, "threads": args.threads,
                      "runs": args.runs, "rows": rows}))


if __name__ == "__main__":
    main()
