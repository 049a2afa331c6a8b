"""The stages of `ekg-prune` and what each depends on.

A stage is a library function of (config, workdir) -- the same one its own CLI runs:
- `train`: `ekg_tf.train.runner.run_train` into `workdir/train/` (the dense network);
- `search`: `ekg_tf.subnet_search.pipeline.run_search` (adaptation, EKG search,
  memory bank) into `workdir/search/` and `workdir/memory_bank/`;
- `finetune`: `ekg_tf.finetune.runner.run_finetune` into `workdir/finetune/`;
- `qat` (optional, never a default): `ekg_tf.qat.pipeline.run_qat` into `workdir/qat/`
  (quantization-aware training of the fine-tuned network to a full-int8 TFLite file,
  which the export stage then verifies as `tflite_int8_qat`; needs `ekg_tf[qat]`);
- `export`: `ekg_tf.export.runner.run_export` into `workdir/export/`.
After a `train` stage, the later stages start from its weights (`model.init`).

Each stage depends on some config keys (`Stage.keys`: sections or dotted keys, minus
`IGNORED` keys that change how a run is logged or checkpointed, never its result).
Their values are the stage's fingerprint: recorded when it starts and when it is done,
compared on every later run, so that a changed key is named, not silently mixed in.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

# Keys that never change a stage's result (logging, checkpoint frequency, compilation,
# strategy: N replicas compute what one device computes).
IGNORED = ("train.log_every_steps", "train.checkpoint_every_steps", "train.keep_checkpoints",
           "train.jit_compile", "strategy")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    keys: tuple             # config sections / dotted keys the result depends on
    outputs: tuple          # folders under the workdir that the stage owns
    collective: bool        # runs tf.distribute collectives (every worker must run it)
    run: Callable           # run(config, workdir, strategy, log) -> result dict

    def fingerprint(self, flat_config: dict) -> dict:
        """The values of the keys this stage depends on."""
        def wanted(key):
            return (any(key == k or key.startswith(k + ".") for k in self.keys)
                    and not any(key == k or key.startswith(k + ".") for k in IGNORED))
        return {k: v for k, v in flat_config.items() if wanted(k)}


def flatten(config) -> dict:
    """{'a.b': value} of an ml_collections config, JSON-normalised (tuples -> lists)."""
    out = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if hasattr(value, "items"):
                walk(name + ".", value)
            else:
                out[name] = json.loads(json.dumps(value, default=str))

    walk("", config.to_dict() if hasattr(config, "to_dict") else config)
    return out


def _train(config, workdir, strategy, log):
    from ekg_tf.train.runner import run_train
    result = run_train(config, os.path.join(workdir, "train"), log=log, strategy=strategy)
    return result


def _search(config, workdir, strategy, log):
    from ekg_tf.errors import UserError
    from ekg_tf.subnet_search.pipeline import run_search
    result = run_search(config, workdir, log=log, strategy=strategy)
    if result["status"] != "done":
        raise UserError(f"the search stopped at step {result['steps']} above the target "
                        f"(search.max_steps={config.search.max_steps}): raise "
                        "search.max_steps and run the same command again to continue")
    return result


def _finetune(config, workdir, strategy, log):
    from ekg_tf.finetune.runner import run_finetune
    return run_finetune(config, workdir, log=log, strategy=strategy)


def _qat(config, workdir, strategy, log):
    from ekg_tf.qat.pipeline import run_qat
    # Its own worker process and strategy. A QAT file that fails its tolerance fails the
    # stage (status "failed": the run stops before export; qat/export/ has the report).
    return run_qat(config, workdir, log=log)


def _export(config, workdir, strategy, log):
    from ekg_tf.export.runner import run_export, summary
    report = run_export(config, workdir, log=log)
    return {**summary(report), "report": report}


STAGES = (
    Stage("train", ("model", "data", "train", "seed"), ("train",), True, _train),
    Stage("search", ("model", "data", "search", "seed"), ("search", "memory_bank"), True,
          _search),
    Stage("finetune", ("model", "data", "search", "finetune", "seed", "train"), ("finetune",),
          True, _finetune),
    Stage("qat", ("model", "data", "search", "finetune", "seed", "train", "qat",
                  "export.verify_images", "export.int8_calibration",
                  "export.representative_images", "export.representative_path",
                  "export.fold_batch_norm", "export.latency_runs", "export.threads"),
          ("qat",), False, _qat),
    Stage("export", ("model", "data", "export", "seed", "search.bn_recalibration_images"),
          ("export",), False, _export),
)
BY_NAME = {s.name: s for s in STAGES}
