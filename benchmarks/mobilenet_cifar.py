"""A network that is not a ResNet, end to end on real data: keras.applications MobileNetV2.

    python benchmarks/mobilenet_cifar.py [--workdir=runs/mbv2_cifar] [--train_epochs=20]

Runs the CLIs on the real CIFAR-10 files in ../shared, in one workdir (each stage
resumes if interrupted: run the same command again):
1. `ekg-train`: MobileNetV2 (keras.applications, random init, its own preprocessing,
   32x32 inputs) trained on the 50,000 training images;
2. `ekg-search`: the EKG search to 0.5 of its MACs + the memory bank;
3. `ekg-finetune`: a short EKG fine-tuning (`--finetune_epochs`);
4. `ekg-export`: SavedModel, TFLite (float32/float16/dynamic/int8) and ONNX, each
   verified against the Keras model, dense and pruned latency.
Test top-1 is on the 1,000 lossless test images. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
TRAIN = os.path.join(SHARED, "data", "cifar10", "cifar10_train.npz")
TEST = os.path.join(SHARED, "data", "cifar10", "cifar10_test1000_lossless.npz")


def run(command: str, args: list) -> dict:
    """Runs one ekg-* CLI (as a module of this checkout); returns its final JSON line."""
    module = {"ekg-train": "ekg_tf.cli.train", "ekg-search": "ekg_tf.cli.search",
              "ekg-finetune": "ekg_tf.cli.finetune", "ekg-export": "ekg_tf.export.cli"}[command]
    print(f"$ {command} {' '.join(args)}", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, stdout=subprocess.PIPE,
                          env=dict(os.environ, PYTHONPATH=REPO), text=True)
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    if proc.returncode not in (0, 1) or not result:  # export exits 1 when an artifact fails
        sys.exit(f"{command} failed (exit {proc.returncode})")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=os.path.join(REPO, "runs", "mbv2_cifar"))
    p.add_argument("--train_epochs", type=int, default=20)
    p.add_argument("--finetune_epochs", type=int, default=2)
    p.add_argument("--target", type=float, default=0.5)
    args = p.parse_args()
    for path in (TRAIN, TEST):
        if not os.path.exists(path):
            sys.exit(f"needs {path} (../shared beside the repository)")
    common = [f"--config={os.path.join(REPO, 'configs', 'cifar10_mobilenetv2.py')}",
              f"--workdir={args.workdir}", "--config.data.source=npz",
              f"--config.data.train_path={TRAIN}", f"--config.data.test_path={TEST}"]
    weights = f"--config.model.init_weights={os.path.join(args.workdir, 'model.weights.h5')}"
    trained = run("ekg-train", common + [f"--config.train.epochs={args.train_epochs}"])
    searched = run("ekg-search", common + [weights, f"--config.search.target_ratio={args.target}"])
    tuned = run("ekg-finetune", common + [weights, f"--config.search.target_ratio={args.target}",
                                          f"--config.finetune.epochs={args.finetune_epochs}"])
    exported = run("ekg-export", common + [weights, f"--config.search.target_ratio={args.target}",
                                           "--formats=saved_model,tflite,onnx",
                                           "--quantize=none,float16,dynamic,int8"])
    dense = exported.get("dense_latency_ms") or {}
    print("MobileNetV2 (keras.applications) on CIFAR-10, test top-1 on the 1,000 lossless "
          "test images")
    print("| stage | top-1 | MACs | MACs ratio | params ratio |")
    print("|---|---|---|---|---|")
    print(f"| trained ({args.train_epochs} epochs) | {trained['top1']:.4f} | {trained['macs']:,} "
          f"| 1.000 | 1.000 |")
    print(f"| searched, BN batch stats / re-estimated | {searched['test_top1_bn_train_mode']:.4f}"
          f" / {searched['test_top1_bn_recalibrated']:.4f} | - | {searched['macs_ratio']:.3f} | "
          f"{searched['params_ratio']:.3f} |")
    print(f"| fine-tuned ({args.finetune_epochs} epochs EKG) | {tuned['top1']:.4f} | "
          f"{tuned['macs']:,} | {tuned['macs_ratio']:.3f} | {tuned['params_ratio']:.3f} |")
    print("| artifact | status | top-1 agreement | top-1 | size | pruned / dense ms, batch 1 | "
          "batch 32 |")
    print("|---|---|---|---|---|---|---|")
    dense_of = {"keras": "keras", "tflite_float32": "tflite_float32", "onnx": "onnx"}
    for name, a in exported["artifacts"].items():
        lat = a["latency_ms"]
        ref = dense.get(dense_of.get(name, ""), {})
        cells = [f"{lat[f'batch{b}']:.2f}" + (f" / {ref[f'batch{b}']:.2f}" if ref else "")
                 for b in (1, 32)]
        print(f"| {name} | {a['status']} | {a['top1_agreement']:.4f} | "
              f"{a.get('top1_accuracy') or 0:.4f} | {a['size_bytes'] / 1e6:.2f} MB | "
              f"{cells[0]} | {cells[1]} |")
    print(json.dumps({"trained_top1": trained["top1"], "searched": searched,
                      "finetuned": tuned, "export": exported}))


if __name__ == "__main__":
    main()
