"""Prune, then quantize: float vs post-training int8 (mse, minmax) vs QAT int8 TFLite.

    ekg-qat --config=configs/cifar10_resnet56.py --workdir=W --config.qat.mode=float  # QAT
    python benchmarks/qat.py --workdir=W    # this table; its latencies want a quiet machine

Reads the QAT run of `W/qat/`: the float network it started from (`float.keras`, the
fine-tuned pruned network) and its full-int8 TFLite file. Converts the float network
(BN folded, as ekg-export) to TFLite float32 and to full-int8 with `mse` and `minmax`
calibration on 256 training images per calibration sample (--seeds), and runs every
model with LiteRT on the 1,000 lossless CIFAR-10 test images: top-1, top-1 agreement
with the float Keras network, logit RMS error, file size, and latency (median wall ms
of --runs runs at batch 1 and 32, --threads threads; the models take turns in
--rounds rounds so that load changes hit all alike). Prints a table, the issue's checks
(QAT int8 within 0.3 points of float, agreement >= 99.5%) and a JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared")

MAX_DROP_POINTS = 0.3     # the issue: QAT int8 within 0.3 points of float
MIN_AGREEMENT = 0.995     # and top-1 agreement >= 99.5%


def top2_margins(logits):
    """Per image, its largest logit minus its second largest (how near a tie it is)."""
    import numpy as np
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def near_ties(margins) -> dict:
    """How many images a quantized model could flip: top-2 margins below 0.2 and 0.4."""
    import numpy as np
    return {"below_0.2": int(np.sum(margins < 0.2)), "below_0.4": int(np.sum(margins < 0.4)),
            "median_margin": float(np.median(margins))}


def near_ties_line(ties: dict) -> str:
    return (f"near-ties of the float network: {ties['below_0.2']} images with a top-2 logit "
            f"margin below 0.2, {ties['below_0.4']} below 0.4 (median "
            f"{ties['median_margin']:.2f})")


def flips(out, ref, margins) -> tuple[float, list]:
    """(top-1 agreement of logits `out` with `ref`, sorted float margins of the flipped images)."""
    import numpy as np
    flipped = out.argmax(1) != ref.argmax(1)
    return float(1.0 - np.mean(flipped)), sorted(round(float(m), 3) for m in margins[flipped])


def timings(runners: dict, x, batches, runs: int, rounds: int) -> dict:
    """{name: {batch<b>: median ms}} with the models taking turns (`rounds` blocks)."""
    out = {name: {b: [] for b in batches} for name in runners}
    for name, fn in runners.items():  # warm-up: allocation, XNNPACK packing
        for b in batches:
            for _ in range(3):
                fn(x[:b])
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, fn in runners.items():
            for b in batches:
                for _ in range(per_round):
                    start = time.perf_counter()
                    fn(x[:b])
                    out[name][b].append(1000.0 * (time.perf_counter() - start))
    return {name: {f"batch{b}": statistics.median(v) for b, v in d.items()}
            for name, d in out.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a workdir after ekg-qat (W/qat/)")
    p.add_argument("--train", default=os.path.join(SHARED, "data", "cifar10", "cifar10_train.npz"))
    p.add_argument("--test", default=os.path.join(SHARED, "data", "cifar10",
                                                   "cifar10_test1000_lossless.npz"))
    p.add_argument("--normalization", default="cifar10")
    p.add_argument("--seeds", default="1", help="calibration samples of post-training int8 "
                   "(1 = ekg-export's and ekg-qat's sample for config.seed 0)")
    p.add_argument("--images", type=int, default=256, help="calibration images per sample")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    qat_dir = os.path.join(args.workdir, "qat")
    float_path = os.path.join(qat_dir, "float.keras")
    qat_path = os.path.join(qat_dir, "model_int8_qat.tflite")
    for path in (float_path, qat_path, args.train, args.test):
        if not os.path.exists(path):
            sys.exit(f"error: {path} does not exist (run ekg-qat --workdir={args.workdir} first)")

    import keras
    import numpy as np
    from ekg_tf.data import normalize
    from ekg_tf.slimming import fold_batch_norm
    from ekg_tf.export import tflite
    from ekg_tf.latency.runtimes import edge_saved_model
    from ekg_tf.export.weights_io import sample_indices

    float_model = keras.models.load_model(float_path, compile=False, safe_mode=True)
    with np.load(args.train) as f:
        x_train = f["x"]
    with np.load(args.test) as f:
        x_test, y_test = normalize(f["x"], args.normalization).numpy(), f["y"]
    ref = float_model.predict(x_test, batch_size=250, verbose=0)
    result_path = os.path.join(qat_dir, "result.json")
    qat_result = json.load(open(result_path)) if os.path.exists(result_path) else {}

    tmp = tempfile.mkdtemp(prefix="ekg-qat-bench-")
    files = {}
    try:
        edge = edge_saved_model(fold_batch_norm(float_model), os.path.join(tmp, "edge"))
        blobs = {"tflite float32": (tflite.convert(edge, "none"), None, None)}
        for seed in [int(s) for s in args.seeds.split(",")]:
            rep = normalize(x_train[sample_indices(len(x_train), args.images, seed)],
                            args.normalization).numpy()
            for calibration in ("mse", "minmax"):
                t0 = time.time()
                blob = tflite.convert(edge, "int8", rep, calibration=calibration)
                blobs[f"PTQ int8 {calibration} (seed {seed})"] = (blob, calibration,
                                                                   time.time() - t0)
        for name, (blob, _, _) in blobs.items():
            files[name] = os.path.join(tmp, f"{len(files)}.tflite")
            with open(files[name], "wb") as f:
                f.write(blob)
        files["QAT int8"] = qat_path
        runners = {name: tflite.TFLiteRunner(path, num_threads=args.threads)
                   for name, path in files.items()}
        rows = []
        # The flips an int8 model makes sit on the float network's near-ties: their float
        # margins (largest minus second logit) say how close int8 must get to keep them.
        margins = top2_margins(ref)
        float_top1 = float(np.mean(ref.argmax(1) == y_test))
        rows.append({"model": "Keras float (pruned, fine-tuned)", "top1": float_top1,
                     "top1_agreement": 1.0, "logit_rms_error": 0.0,
                     "size_bytes": os.path.getsize(float_path)})
        for name, runner in runners.items():
            out = runner.predict(x_test)
            agreement, flipped_margins = flips(out, ref, margins)
            rows.append({"model": name, "top1": float(np.mean(out.argmax(1) == y_test)),
                         "top1_agreement": agreement,
                         "logit_rms_error": float(np.sqrt(np.mean((out - ref) ** 2))),
                         "flipped_float_margins": flipped_margins,
                         "size_bytes": os.path.getsize(files[name])})
        latency = timings(runners, x_test[:32], (1, 32), args.runs, args.rounds)
        for row in rows[1:]:
            row["latency_ms"] = latency[row["model"]]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    qat_row = rows[-1]
    checks = {"qat_drop_points": 100 * (float_top1 - qat_row["top1"]),
              "within_0.3_points": 100 * (float_top1 - qat_row["top1"]) <= MAX_DROP_POINTS,
              "agreement_at_least_0.995": qat_row["top1_agreement"] >= MIN_AGREEMENT}
    print(f"float network {float_path}; {len(y_test)} test images ({args.test}); QAT: "
          f"{qat_result.get('mode')} mode, {qat_result.get('steps')} steps, lr "
          f"{qat_result.get('learning_rate')} {qat_result.get('schedule')}; LiteRT "
          f"{args.threads} threads, median of {args.runs} runs")
    ties = near_ties(margins)
    print(near_ties_line(ties))
    print("| model | top-1 | top-1 agreement | logit RMS error | size (KB) | ms b1 | ms b32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lat = r.get("latency_ms") or {}
        b1, b32 = lat.get("batch1"), lat.get("batch32")
        print(f"| {r['model']} | {r['top1']:.3f} | {r['top1_agreement']:.3f} | "
              f"{r['logit_rms_error']:.3f} | {r['size_bytes'] / 1024:.1f} | "
              f"{'-' if b1 is None else f'{b1:.2f}'} | {'-' if b32 is None else f'{b32:.2f}'} |")
    print(f"QAT int8: {checks['qat_drop_points']:+.1f} points below float (within "
          f"{MAX_DROP_POINTS}: {checks['within_0.3_points']}), agreement "
          f"{qat_row['top1_agreement']:.3f} (>= {MIN_AGREEMENT}: "
          f"{checks['agreement_at_least_0.995']})")
    for r in rows[1:]:
        print(f"{r['model']}: float margins of its flips {r['flipped_float_margins']}")
    print(json.dumps({"workdir": args.workdir, "float_top1": float_top1,
                      "float_near_ties": ties, "rows": rows,
                      "checks": checks, "qat": {k: v for k, v in qat_result.items()
                                                if k != "history"}}))


if __name__ == "__main__":
    main()
