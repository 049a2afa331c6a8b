"""onnxruntime settings of the dense and the pruned ResNet-56: what makes batch 1 slow.

    python benchmarks/onnx_settings.py --subnet=workdir/search/subnet.json [--threads=2]

Converts the dense and the pruned network (BN folded, as ekg-export ships them) with
tf2onnx (opset 17) twice: with the Keras model's NHWC input (what ekg-export writes) and
with `inputs_as_nchw` (an NCHW input, no layout transpose at the input). Counts the
Transpose nodes before and after onnxruntime's graph optimisation, then times every
session setting (graph optimisation level, intra-op threads, execution mode) for both
networks in alternating rounds (medians of --runs runs after warm-up) at batch 1 and 32.
Prints a table (pruned/dense ratio per setting next to the MACs ratio) and a JSON line.
Run it on a quiet machine (nothing else busy): the timings are the evidence.
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

LEVELS = ("ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")


def convert(folded, path: str, nchw: bool):
    """tf2onnx opset 17 of `folded`; `nchw`: the input transposed to NCHW by the converter."""
    import onnx
    import tensorflow as tf
    import tf2onnx
    shape = [None, *(int(d) for d in folded.inputs[0].shape[1:])]
    fn = tf.function(lambda images: {"logits": folded(images, training=False)})
    proto, _ = tf2onnx.convert.from_function(
        fn, input_signature=[tf.TensorSpec(shape, tf.float32, name="images")], opset=17,
        inputs_as_nchw=["images"] if nchw else None)
    onnx.save(proto, path)
    return sum(n.op_type == "Transpose" for n in proto.graph.node)


def session(path: str, level: str, threads: int, parallel: bool, optimized: str | None = None,
            spinning: bool = True):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if not spinning:  # pool threads sleep instead of spin-waiting between ops
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if parallel
                           else ort.ExecutionMode.ORT_SEQUENTIAL)
    if optimized:
        opts.optimized_model_filepath = optimized
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def optimized_ops(path: str, level: str, tmp: str) -> dict:
    """Op counts of the graph onnxruntime runs (after its optimisation)."""
    import collections
    import onnx
    out = os.path.join(tmp, "opt-" + os.path.basename(path))
    session(path, level, 1, False, optimized=out)
    ops = collections.Counter(n.op_type for n in onnx.load(out).graph.node)
    return {k: ops[k] for k in ("Transpose", "Conv", "FusedConv", "ReorderInput",
                                "ReorderOutput") if ops.get(k)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=os.path.join(SHARED, "reference", "res56_cifar10.npz"))
    p.add_argument("--subnet", required=True, help="SubnetSpec JSON (a search result)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--batches", default="1,32")
    args = p.parse_args()
    for path in (args.weights, args.subnet):
        if not os.path.exists(path):
            sys.exit(f"error: {path} does not exist")

    import numpy as np
    from ekg_tf.flops import ComplexityCounter
    from ekg_tf.graph.gated import GatedModel
    from ekg_tf.latency.runtimes import time_alone
    from ekg_tf.models import build_model
    from ekg_tf.slimming import fold_batch_norm, slim_model
    from ekg_tf.subnet import SubnetSpec
    from ekg_tf.weights import load_weights

    model = GatedModel(build_model("resnet56", 10))
    load_weights(model, args.weights)
    spec = SubnetSpec.from_json(args.subnet)
    macs_ratio = ComplexityCounter(model, round_to=spec.round_to).macs_ratio(spec.rates)
    nets = {"dense": fold_batch_norm(slim_model(model, name="dense")),
            "pruned": fold_batch_norm(slim_model(model, spec, name="pruned"))}
    tmp = tempfile.mkdtemp(prefix="ekg-onnxset-")
    rows, graphs = [], {}
    try:
        paths = {}
        for layout in ("nhwc", "nchw"):
            for tag, net in nets.items():
                path = os.path.join(tmp, f"{tag}-{layout}.onnx")
                transposes = convert(net, path, layout == "nchw")
                paths[tag, layout] = path
                graphs[f"{tag}-{layout}"] = {"transposes_in_file": transposes,
                                             "after_ORT_ENABLE_ALL": optimized_ops(
                                                 path, "ORT_ENABLE_ALL", tmp),
                                             "after_ORT_ENABLE_BASIC": optimized_ops(
                                                 path, "ORT_ENABLE_BASIC", tmp)}
        settings = [(layout, level, t, False, True) for layout in ("nhwc", "nchw")
                    for level in LEVELS for t in sorted({1, args.threads})]
        settings += [("nhwc", "ORT_ENABLE_ALL", args.threads, True, True),
                     ("nhwc", "ORT_ENABLE_ALL", args.threads, False, False)]
        rng = np.random.default_rng(0)
        for b in [int(v) for v in args.batches.split(",")]:
            x = rng.normal(size=(b, 32, 32, 3)).astype(np.float32)
            for layout, level, threads, parallel, spinning in settings:
                xin = np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "nchw" else x
                openers = [lambda p=paths[tag, layout]: session(p, level, threads, parallel,
                                                                spinning=spinning)
                           for tag in ("dense", "pruned")]
                dense_ms, pruned_ms = time_alone(openers, xin, runs=args.runs, rounds=5)
                rows.append({"batch": b, "layout": layout, "level": level, "threads": threads,
                             "mode": "parallel" if parallel else "sequential",
                             "spinning": spinning,
                             "dense_ms": dense_ms, "pruned_ms": pruned_ms,
                             "ratio": pruned_ms / dense_ms})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"sub-network {args.subnet}: MACs ratio {macs_ratio:.3f}; median of {args.runs} runs; "
          f"load average at the end {os.getloadavg()[0]:.2f}")
    for name, g in graphs.items():
        print(f"graph {name}: {g}")
    print("| batch | input | graph optimisation | intra-op threads | mode | spinning | "
          "dense ms | pruned ms | pruned/dense | / MACs ratio |")
    print("|---:|---|---|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['layout']} | {r['level']} | {r['threads']} | {r['mode']} | "
              f"{'on' if r['spinning'] else 'off'} | "
              f"{r['dense_ms']:.3f} | {r['pruned_ms']:.3f} | {r['ratio']:.3f} | "
              f"{r['ratio'] / macs_ratio:.2f} |")
    print(json.dumps({"subnet": args.subnet, "macs_ratio": macs_ratio, "graphs": graphs,
                      "rows": rows}))


if __name__ == "__main__":
    main()
