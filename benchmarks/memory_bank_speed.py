"""Memory-bank build time of the published ResNet-56 searched to 0.45 (real CIFAR-10).

    python benchmarks/memory_bank_speed.py --search_workdir=runs/r56_045 \
        --before=/path/to/a/checkout/of/the/old/code

Builds the 5-teacher bank of that search (its `search/history.json` and
`search/weights.weights.h5`, read only) over the 50,000 training images exactly as
ekg-search does (`ekg_tf.subnet_search.pipeline._memory_bank`, the reference CIFAR
config: data.eval_batch_size 256, shard size 10,000) into `<out>/<label>/`, times it,
and compares its logits with the bank of `--compare_bank` (default: the search
workdir's own `memory_bank/`, written by the code of that search): max |difference|
and its ratio to the logits' scale (max |logit|), argmax agreement, and the KL divergence
of the distillation targets (softmax at the bank's temperature) per image and teacher;
both banks are stored in float16 (~1e-3 relative). `--config key=value` sets config keys (e.g.
`search.memory_bank_precision=mixed_bfloat16`). `--code=DIR` imports `ekg_tf` from DIR;
`--before=DIR` first runs the same with `--code=DIR` (a subprocess), back to back.
Run it on a quiet machine (nothing else busy: the timings are the result); on a shared
virtual machine the process CPU time (`cpu s`) and the host's stolen CPU time during the
run (`steal s`, /proc/stat) are printed beside the wall time, as the latter moves the
wall time between runs. Prints a table and, last, one JSON
line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
from finetune_throughput import _argv_without  # noqa: E402  (this folder: the same --before split)


def make_config(settings):
    from ekg_tf.config import reference_cifar_config
    config = reference_cifar_config("resnet56", "cifar10")
    config.model.init = os.path.join(SHARED, "reference", "res56_cifar10.npz")
    config.data.train_path = os.path.join(SHARED, "data", "cifar10", "cifar10_train.npz")
    config.data.test_path = os.path.join(SHARED, "data", "cifar10",
                                         "cifar10_test1000_lossless.npz")
    for item in settings:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        if name not in config[section]:
            return None  # this version of the code has no such setting
        old = config[section][name]
        config[section][name] = type(old)(value) if not isinstance(old, bool) else \
            value.lower() in ("1", "true", "yes")
    return config


def measure(args):
    import numpy as np
    from ekg_tf.graph.gated import GatedModel
    from ekg_tf.models.sources import model_from_config
    from ekg_tf.subnet_search import pipeline
    from ekg_tf.subnet_search.memory_bank import MemoryBank
    from ekg_tf.weights import load_weights

    config = make_config(args.config)
    if config is None:
        return None
    with open(os.path.join(args.search_workdir, "search", "history.json")) as f:
        history = json.load(f)["history"]
    model = GatedModel(model_from_config(config, load_init=False))
    load_weights(model, os.path.join(args.search_workdir, "search", "weights.weights.h5"))
    workdir = os.path.join(args.out, args.label)
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    t0, c0, s0 = time.perf_counter(), time.process_time(), host_steal_seconds()
    meta = pipeline._memory_bank(model, config, workdir, history, log=lambda m: None)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    steal_seconds = host_steal_seconds() - s0
    new = MemoryBank.open(os.path.join(workdir, "memory_bank"))
    old = MemoryBank.open(args.compare_bank or os.path.join(args.search_workdir, "memory_bank"))
    idx = np.arange(new.num_examples)
    a, b = new.lookup(idx), old.lookup(idx)
    diff = np.abs(a - b)
    scale = float(np.abs(b).max())
    agree = float((a.argmax(1) == b.argmax(1)).mean())
    kl = soft_target_kl(b, a, float(new.meta["temperature"]))
    return {"label": args.label, "config": args.config, "seconds": seconds,
            "cpu_seconds": cpu_seconds,  # a shared host's stolen time is not in it
            "steal_seconds": steal_seconds,
            "images_per_second": new.num_examples / seconds,
            "teachers": [t["step"] for t in meta["teachers"]],
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "logit_scale": scale, "max_rel_diff": float(diff.max()) / scale,
            "argmax_agreement": agree, "soft_target_kl_mean": float(kl.mean()),
            "soft_target_kl_max": float(kl.max())}


def host_steal_seconds() -> float:
    """CPU seconds the hypervisor gave to other guests since boot, all CPUs together
    (/proc/stat `steal`; 0 where it is not reported). Time a sibling hyperthread's load
    takes is not in it."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def soft_target_kl(reference, other, temperature):
    """KL(softmax(reference / T) || softmax(other / T)) per image and teacher: how far the
    distillation targets moved (logits [N, classes, teachers])."""
    import numpy as np

    def log_softmax(z):
        z = z / temperature
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))
    lp, lq = log_softmax(reference.astype(np.float64)), log_softmax(other.astype(np.float64))
    return (np.exp(lp) * (lp - lq)).sum(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--search_workdir", required=True,
                    help="workdir of ekg-search (search/ + memory_bank/), read only")
    ap.add_argument("--compare_bank", default="")
    ap.add_argument("--out", default="/tmp/ekg_memory_bank_speed")
    ap.add_argument("--config", action="append", default=[], help="section.key=value")
    ap.add_argument("--code", default="")
    ap.add_argument("--label", default="")
    ap.add_argument("--before", default="")
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.code or REPO))
    args.label = args.label or ("before" if args.code else "after")
    rows = []
    if args.before:
        cmd = [sys.executable, os.path.abspath(__file__), "--code", args.before, "--label",
               "before"] + _argv_without(sys.argv[1:], ("--before", "--code", "--label",
                                                        "--config"))
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows += json.loads(out.strip().splitlines()[-1])["rows"]
    row = measure(args)
    if row is not None:
        rows.append(row)
    print(f"\n{'label':<10}{'config':<40}{'seconds':>9}{'cpu s':>8}{'steal s':>8}{'img/s':>8}{'max|d|':>9}"
          f"{'max|d|/scale':>13}{'argmax':>8}{'KL(T) mean':>12}{'KL(T) max':>11}")
    for r in rows:
        print(f"{r['label']:<10}{','.join(r['config']) or '-':<40}{r['seconds']:>9.1f}"
              f"{r.get('cpu_seconds', float('nan')):>8.0f}"
              f"{r.get('steal_seconds', float('nan')):>8.0f}"
              f"{r['images_per_second']:>8.0f}{r['max_abs_diff']:>9.4f}"
              f"{r['max_rel_diff']:>13.2e}{r['argmax_agreement']:>8.4f}"
              f"{r.get('soft_target_kl_mean', float('nan')):>12.2e}"
              f"{r.get('soft_target_kl_max', float('nan')):>11.2e}")
    if len(rows) > 1:
        print(f"\n{rows[-1]['label']} / {rows[0]['label']}: "
              f"{rows[-1]['seconds'] / rows[0]['seconds']:.3f} of the time, "
              f"{rows[-1]['cpu_seconds'] / rows[0]['cpu_seconds']:.3f} of the CPU time")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
