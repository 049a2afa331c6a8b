"""`run_pipeline`: the whole method in one workdir, stage by stage, durable.

    result = run_pipeline(config, "runs/r56", stages=("search", "finetune", "export"))

For each selected stage, in order:
1. its record `workdir/stages/<stage>.json` is read: `done` with the same fingerprint
   (the config keys it depends on, and the records of the stages before it) -> skipped;
   a record with another fingerprint -> refused, naming the keys that differ, unless
   the stage is in `overwrite` (then its outputs and those of every later stage are
   deleted and it runs again);
2. temporary files a killed run left in its folders are removed;
3. it is recorded as `running` (with the fingerprint), run -- the stage function resumes
   from its own checkpoints -- and recorded as `done` with its result and seconds.
Then `report.md`/`report.json` are written (`ekg_tf.pipeline.report`).

A SIGKILL at any moment and the same call again give the uninterrupted result. One
process at a time writes a workdir (a lock). Under `MultiWorkerMirroredStrategy`
(TF_CONFIG) every worker runs the same stages -- their collectives must match -- but
only the chief writes the workdir: the others work in a private copy of it (read from
the shared filesystem at the start) that they delete at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

from ekg_tf.errors import UserError
from ekg_tf.pipeline.stages import BY_NAME, STAGES, flatten
from ekg_tf.utils.io import atomic_write_json, directory_lock, remove_temporaries

DEFAULT_STAGES = ("train", "search", "finetune", "export")


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def parse_stages(stages, config) -> list[str]:
    """The stages to run, in pipeline order. Default: all four, or without `train` when
    `model.init` names the weights to prune (a trained or published network)."""
    if stages is None or stages == "" or stages == ():
        names = list(DEFAULT_STAGES) if not config.model.init else list(DEFAULT_STAGES[1:])
    else:
        names = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages)
                 if s.strip()]
    bad = [n for n in names if n not in BY_NAME]
    if bad or not names:
        raise UserError(f"unknown stage(s) {bad or names}; choose from {list(BY_NAME)} "
                        "(comma-separated, e.g. --stages=search,finetune,export)")
    return [s.name for s in STAGES if s.name in names]


def record_path(workdir: str, stage: str) -> str:
    return os.path.join(workdir, "stages", f"{stage}.json")


def read_record(workdir: str, stage: str) -> dict | None:
    path = record_path(workdir, stage)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k, '(unset)')!r} -> {current.get(k, '(unset)')!r}"
            for k in keys if saved.get(k) != current.get(k)]


def stage_config(config, workdir: str, ran_train: bool):
    """The config a stage runs with: after a train stage, its weights are `model.init`."""
    config = config.copy_and_resolve_references()
    if ran_train:
        from ekg_tf.train.runner import trained_weights
        with config.unlocked():
            config.model.init = trained_weights(os.path.join(workdir, "train"))
    return config


class Pipeline:
    """One ekg-prune run: the stages of `config` in `workdir` (see the module docstring)."""

    def __init__(self, config, workdir: str, stages=None, overwrite=(), strategy=None,
                 log=None):
        from ekg_tf.config import resolve
        from ekg_tf.distribute import make_strategy
        from ekg_tf.train.loop import is_chief
        self.config = resolve(config)
        self.workdir = os.path.abspath(workdir)
        self.stages = parse_stages(stages, self.config)
        self.overwrite = parse_stages(overwrite, self.config) if overwrite else []
        self.log = log or _log
        self.strategy = strategy or make_strategy(self.config.strategy)
        self.chief = is_chief(self.strategy)
        self.flat = flatten(self.config)
        self.records = {}

    # -- fingerprints
    def fingerprint(self, name: str) -> dict:
        stage = BY_NAME[name]
        before = [s.name for s in STAGES[:STAGES.index(stage)]]
        upstream = {s: self.records[s]["fingerprint_digest"] for s in before
                    if s in self.records}
        return {"config": stage.fingerprint(self.flat), "upstream": upstream}

    def check(self, root: str, name: str) -> str:
        """'run' or 'skip' for stage `name`; refuses a record of another config."""
        record = read_record(root, name)
        if record is None:
            return "run"
        if name in self.overwrite:
            return "overwrite"
        current = self.fingerprint(name)
        diff = differences(record["fingerprint"]["config"], current["config"])
        diff += [f"the {s} stage it started from was redone" for s in current["upstream"]
                 if record["fingerprint"]["upstream"].get(s) != current["upstream"][s]]
        if diff:
            state = "is done" if record["status"] == "done" else "was started"
            raise UserError(
                f"the {name} stage in {root} {state} with another config ("
                + "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
                + f"). Use the same config, another --workdir, or --overwrite={name} to "
                "redo it (and the stages after it)")
        return "skip" if record["status"] == "done" else "run"

    def clear(self, root: str, name: str):
        """Deletes the outputs and records of `name` and every later stage."""
        for stage in STAGES[STAGES.index(BY_NAME[name]):]:
            for folder in stage.outputs:
                shutil.rmtree(os.path.join(root, folder), ignore_errors=True)
            if os.path.exists(record_path(root, stage.name)):
                os.remove(record_path(root, stage.name))
            self.records.pop(stage.name, None)

    # -- running
    def write_record(self, root, name, status, fingerprint, seconds, result=None):
        import hashlib
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        record = {"stage": name, "status": status, "seconds": seconds,
                  "fingerprint": fingerprint, "fingerprint_digest": digest,
                  "result": result or {}}
        atomic_write_json(record_path(root, name), json.loads(json.dumps(record, default=str)))
        return record

    def run_stage(self, root: str, name: str) -> dict:
        stage = BY_NAME[name]
        decision = self.check(root, name)
        if decision == "skip":
            self.log(f"[ekg-prune] {name}: done before, skipped")
            return read_record(root, name)
        if decision == "overwrite":
            self.log(f"[ekg-prune] {name}: --overwrite: its outputs and later stages' deleted")
            self.clear(root, name)
        if not self.chief and not stage.collective:
            return {"status": "skipped on a non-chief worker", "result": {}}
        for folder in stage.outputs:
            removed = remove_temporaries(os.path.join(root, folder))
            if removed:
                self.log(f"[ekg-prune] {name}: removed {len(removed)} temporary file(s) of an "
                         "interrupted run")
        previous = read_record(root, name)
        seconds_before = float(previous["seconds"]) if previous else 0.0
        fingerprint = self.fingerprint(name)
        self.write_record(root, name, "running", fingerprint, seconds_before)
        self.log(f"[ekg-prune] {name}: running")
        start = time.time()
        config = stage_config(self.config, root, "train" in self.records)
        result = stage.run(config, root, self.strategy, self.log)
        seconds = seconds_before + time.time() - start
        status = "done" if result.get("status", "done") in ("done", "ok") else "failed"
        record = self.write_record(root, name, status, fingerprint, seconds, result)
        self.log(f"[ekg-prune] {name}: {status} in {seconds:.1f} s")
        return record

    def run_in(self, root: str) -> dict:
        records = {}
        for name in [s.name for s in STAGES]:
            if name in self.stages:
                record = self.run_stage(root, name)
                if record.get("status") == "failed":
                    records[name] = record
                    break
            else:
                record = read_record(root, name)  # an earlier run's stage, for the report
                if record is None or record["status"] != "done":
                    continue
            records[name] = self.records[name] = record
        return records

    def run(self) -> dict:
        """Runs the stages; returns {"records": ..., "report": ...} (report None on
        non-chief workers)."""
        from ekg_tf.pipeline.report import write_report
        if self.chief:
            with directory_lock(self.workdir, "this workdir"):
                _barrier(self.strategy)
                records = self.run_in(self.workdir)
                report = write_report(self.config, self.workdir, records, self.stages)
            return {"records": records, "report": report}
        scratch = tempfile.mkdtemp(prefix="ekg_tf-worker-")
        try:
            root = os.path.join(scratch, "workdir")
            if os.path.isdir(self.workdir):
                shutil.copytree(self.workdir, root, ignore=shutil.ignore_patterns(".lock"))
            os.makedirs(root, exist_ok=True)
            _barrier(self.strategy)  # the chief writes only once every worker has copied
            from ekg_tf.train.loop import private_workdir
            with private_workdir():
                return {"records": self.run_in(root), "report": None}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _barrier(strategy):
    """All workers meet here (a one-number all-reduce); a no-op on one worker."""
    import tensorflow as tf
    if getattr(strategy.extended, "_num_workers", 1) > 1 or \
            isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        value = strategy.run(lambda: tf.constant(1.0))
        strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)


def run_pipeline(config, workdir: str, stages=None, overwrite=(), strategy=None,
                 log=None) -> dict:
    """Runs (or resumes) the selected stages of `config` in `workdir` and writes the run
    report; returns {"records": {stage: record}, "report": report dict}."""
    return Pipeline(config, workdir, stages, overwrite, strategy, log).run()
