"""Full-int8 TFLite: top-1 agreement with Keras for `minmax` vs `mse` activation ranges.

    python benchmarks/int8_calibration.py --workdir=runs/r56_ekg [--weights=...] \
        [--seeds=0,1,2] [--images=256]
    python benchmarks/int8_calibration.py --dense --weights=../shared/reference/res56_cifar10.npz

Takes the sub-network and weights the way `ekg-export` does (workdir/search/subnet.json;
fine-tuned workdir/finetune/best.keras, else the search's weights with BN statistics
re-estimated on training images), or with `--dense` the unpruned --arch network of
--weights (the published one: what a converged network gives), converts full-int8 TFLite
with each calibration on several random samples of training images, and runs every model
with LiteRT on the 1,000 lossless CIFAR-10 test images. Also counts the float network's
near-ties (top-2 logit margins below 0.2 and 0.4): the images an int8 model can flip.
Prints a table and a JSON line.
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
from qat import flips, near_ties, near_ties_line, top2_margins  # noqa: E402  (this folder)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="an ekg-search (and ekg-finetune) workdir")
    p.add_argument("--dense", action="store_true", help="the unpruned --arch network of "
                   "--weights instead of a workdir's sub-network")
    p.add_argument("--weights", default=None, help="default: as ekg-export chooses")
    p.add_argument("--arch", default="resnet56")
    p.add_argument("--train", default=os.path.join(SHARED, "data", "cifar10", "cifar10_train.npz"))
    p.add_argument("--test", default=os.path.join(SHARED, "data", "cifar10",
                                                   "cifar10_test1000_lossless.npz"))
    p.add_argument("--seeds", default="0,1,2", help="calibration samples")
    p.add_argument("--images", type=int, default=256, help="calibration images per sample")
    p.add_argument("--recalibration_images", type=int, default=4096)
    args = p.parse_args()
    if args.dense == bool(args.workdir) or (args.dense and not args.weights):
        sys.exit("error: give --workdir=W, or --dense with --weights=FILE")
    subnet = None if args.dense else os.path.join(args.workdir, "search", "subnet.json")
    for path in (subnet or args.weights, args.train, args.test):
        if not os.path.exists(path):
            sys.exit(f"error: {path} does not exist")

    import numpy as np
    from ekg_tf.config import reference_cifar_config
    from ekg_tf.data import normalize
    from ekg_tf.slimming import fold_batch_norm, recalibrate_batch_norm
    from ekg_tf.subnet import SubnetSpec
    from ekg_tf.export import tflite
    from ekg_tf.latency.runtimes import edge_saved_model
    from ekg_tf.export.weights_io import find_weights, load_slim, sample_indices
    from ekg_tf.models import build_model
    from ekg_tf.weights import load_weights

    config = reference_cifar_config(args.arch, "cifar10")
    if args.dense:
        weights, fine_tuned = args.weights, True
        slim, gated = build_model(args.arch, 10), None
        load_weights(slim, weights)
    else:
        weights, fine_tuned = find_weights(args.workdir, args.weights, "")
        slim, gated = load_slim(config, SubnetSpec.from_json(subnet), weights)
    with np.load(args.train) as f:
        x_train = f["x"]
    with np.load(args.test) as f:
        x_test, y_test = normalize(f["x"], "cifar10").numpy(), f["y"]
    if not fine_tuned and gated is not None:
        idx = sample_indices(len(x_train), args.recalibration_images, 0)
        recalibrate_batch_norm(slim, normalize(x_train[idx], "cifar10").numpy())
    ref = slim.predict(x_test, batch_size=250, verbose=0)
    float_top1 = float(np.mean(ref.argmax(1) == y_test))
    margins = top2_margins(ref)
    ties = near_ties(margins)

    tmp = tempfile.mkdtemp(prefix="ekg-int8-")
    rows = []
    try:
        edge = edge_saved_model(fold_batch_norm(slim), os.path.join(tmp, "edge"))
        for seed in [int(s) for s in args.seeds.split(",")]:
            rep = normalize(x_train[sample_indices(len(x_train), args.images, seed)],
                            "cifar10").numpy()
            for calibration in ("minmax", "mse"):
                t0 = time.time()
                blob = tflite.convert(edge, "int8", rep, calibration=calibration)
                seconds = time.time() - t0
                path = os.path.join(tmp, f"{calibration}_{seed}.tflite")
                with open(path, "wb") as f:
                    f.write(blob)
                out = tflite.TFLiteRunner(path).predict(x_test)
                agreement, flipped_margins = flips(out, ref, margins)
                rows.append({"seed": seed, "calibration": calibration,
                             "top1_agreement": agreement,
                             "flipped_float_margins": flipped_margins,
                             "top1": float(np.mean(out.argmax(1) == y_test)),
                             "logit_rms_error": float(np.sqrt(np.mean((out - ref) ** 2))),
                             "convert_seconds": seconds})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"weights: {weights} (fine-tuned: {fine_tuned}); float top-1 {float_top1:.3f} "
          f"on {len(y_test)} test images; {args.images} calibration images per sample")
    print(near_ties_line(ties))
    print("| seed | calibration | top-1 agreement | int8 top-1 | logit RMS error | convert s |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['calibration']} | {r['top1_agreement']:.3f} | {r['top1']:.3f} "
              f"| {r['logit_rms_error']:.3f} | {r['convert_seconds']:.1f} |")
    for r in rows:
        print(f"seed {r['seed']} {r['calibration']}: float margins of its flips "
              f"{r['flipped_float_margins']}")
    print(json.dumps({"weights": weights, "dense": args.dense, "fine_tuned": fine_tuned,
                      "float_top1": float_top1, "float_near_ties": ties, "rows": rows}))


if __name__ == "__main__":
    main()
