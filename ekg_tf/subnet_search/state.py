"""Durable search state: a search killed at any moment continues from its last completed step.

Layout under `workdir/search/`:
- `history.json`: the commit point, rewritten atomically after every step: the run's
  fingerprint (model/data/search settings that must not change on resume), the
  history (per step: every group's rate and rank, loss, objective, accuracy,
  MACs/params ratios, chosen group), the knowledge file of that step, the
  knowledge count `t`, the RNG state and the elapsed search time.
- `state/knowledge_<step>.npy`: `K` after that step (written before the commit point;
  older ones are removed after it).
- `adapted.weights.h5`: the weights after the adaptation pass (the search, the
  memory bank and fine-tuning start from them).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np

from ekg_tf.errors import UserError
from ekg_tf.utils.io import atomic_path, atomic_write_json

FORMAT_VERSION = 1


@dataclasses.dataclass
class SearchState:
    fingerprint: dict
    history: list            # list of dict entries, history[0] = the unpruned network
    knowledge: np.ndarray    # K [N, classes]
    knowledge_count: int     # t in K = (K*t + k)/(t+1)
    rng_state: dict
    elapsed_seconds: float = 0.0
    done: bool = False

    @property
    def step(self) -> int:
        return len(self.history) - 1


def history_path(search_dir: str) -> str:
    return os.path.join(search_dir, "history.json")


def fingerprint_mismatch(saved: dict, current: dict) -> list:
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if saved.get(k) != current.get(k)]


def save_state(search_dir: str, state: SearchState) -> None:
    """Knowledge file first, then the JSON commit point, then clean-up of older files."""
    state_dir = os.path.join(search_dir, "state")
    os.makedirs(state_dir, exist_ok=True)
    kname = f"knowledge_{state.step:06d}.npy"
    with atomic_path(os.path.join(state_dir, kname)) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(state.knowledge, np.float32))
            f.flush()
            os.fsync(f.fileno())
    atomic_write_json(history_path(search_dir), {
        "version": FORMAT_VERSION, "fingerprint": state.fingerprint, "step": state.step,
        "done": state.done, "elapsed_seconds": state.elapsed_seconds,
        "knowledge_file": os.path.join("state", kname),
        "knowledge_count": state.knowledge_count, "rng_state": state.rng_state,
        "history": state.history})
    for old in glob.glob(os.path.join(state_dir, "knowledge_*.npy")):
        if os.path.basename(old) != kname:
            os.remove(old)


def load_state(search_dir: str, fingerprint: dict) -> SearchState | None:
    """The saved state, or None when there is none; ValueError when it belongs to another run."""
    path = history_path(search_dir)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            d = json.load(f)
        saved_fp = d["fingerprint"]
        history = d["history"]
        kfile = os.path.join(search_dir, d["knowledge_file"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a readable search state ({type(e).__name__}: {e}); "
                         "delete it or use another --workdir") from None
    diff = fingerprint_mismatch(saved_fp, fingerprint)
    if diff:
        details = ", ".join(f"{k}: saved {saved_fp.get(k)!r} vs now {fingerprint.get(k)!r}"
                            for k in diff)
        raise UserError(f"the workdir {os.path.dirname(search_dir)!r} holds a search of another "
                         f"run ({details}); use another --workdir or delete {search_dir!r}")
    if not os.path.exists(kfile):
        raise UserError(f"{path} refers to {kfile!r}, which is missing; the search state is "
                         f"damaged: delete {search_dir!r} to start again")
    return SearchState(fingerprint=saved_fp, history=history, knowledge=np.load(kfile),
                       knowledge_count=int(d["knowledge_count"]), rng_state=d["rng_state"],
                       elapsed_seconds=float(d.get("elapsed_seconds", 0.0)),
                       done=bool(d.get("done", False)))
