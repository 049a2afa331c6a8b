"""The on-disk cache of measured block latencies of one runtime on one machine.

A `LatencyTable` is keyed by the runtime (tflite | onnxruntime), the versions that
convert and run the model (`Runtime.version`), its threads, the batch size and the
CPU (`runtimes.machine_id`): a table measured under another key never answers. Its
file, `<cache_dir>/<runtime>-t<threads>-b<batch>-<hash of the key>.json`, holds

    {"key": {...}, "cells": {"<block signature>|w1,w2,...": ms}, "networks": {...: ms}}

cells being a block at its groups' widths, networks a whole deployed network. Every
`save()` is atomic (a killed build keeps what it measured and resumes from it).
"""
from __future__ import annotations

import hashlib
import json
import os

from ekg_tf.errors import UserError
from ekg_tf.latency.runtimes import Runtime, machine_id
from ekg_tf.utils.io import atomic_write_json

TABLE_FORMAT = 1


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ekg_tf", "latency")


def cell_key(signature: str, widths) -> str:
    return f"{signature}|{','.join(str(int(w)) for w in widths)}"


class LatencyTable:
    """Measured latencies (median ms) of blocks and networks; see the module docstring."""

    def __init__(self, runtime: Runtime, batch: int = 1, cache_dir: str | None = None):
        if isinstance(batch, bool) or int(batch) != batch or int(batch) < 1:
            raise UserError(f"the latency batch size must be an integer >= 1, got {batch!r}")
        self.runtime = runtime
        self.batch = int(batch)
        self.key = {"format": TABLE_FORMAT, "runtime": runtime.name,
                    "version": runtime.version, "threads": runtime.threads,
                    "batch": self.batch, "machine": machine_id()}
        digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:12]
        self.cache_dir = cache_dir or default_cache_dir()
        self.path = os.path.join(self.cache_dir, f"{runtime.name}-t{runtime.threads}-"
                                                 f"b{self.batch}-{digest}.json")
        self.cells, self.networks = {}, {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                stored = json.load(f)
            if stored.get("key") == self.key:  # (a hash collision would be refused here)
                self.cells = {k: float(v) for k, v in stored.get("cells", {}).items()}
                self.networks = {k: float(v) for k, v in stored.get("networks", {}).items()}

    def __len__(self):
        return len(self.cells)

    def cell(self, signature: str, widths) -> float | None:
        return self.cells.get(cell_key(signature, widths))

    def put_cell(self, signature: str, widths, ms: float) -> None:
        self.cells[cell_key(signature, widths)] = float(ms)

    def save(self) -> None:
        atomic_write_json(self.path, {"key": self.key, "cells": self.cells,
                                      "networks": self.networks})
