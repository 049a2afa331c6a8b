"""Sub-network specs: the rates and ranks of every gate group, as a value object.

A `SubnetSpec` is what the search produces and what slimming, fine-tuning and
export consume. Groups are named by the traced graph (the first layer producing
their channels). JSON form (`to_json`):
  {"arch": "resnet56", "num_classes": 10, "input_shape": [32, 32, 3],
   "groups": {"conv": {"channels": 16, "rate": 0.75, "rank": [...],
                       "kept_indices": [...]}, ...}}
`arch` is the model's name (informative); a spec fits a model when its groups have
the same names and channel counts.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from ekg_tf.errors import UserError
from ekg_tf.graph.gates import kept_count
from ekg_tf.utils.io import atomic_write_text


@dataclasses.dataclass(frozen=True)
class GroupState:
    channels: int
    rate: float
    rank: tuple

    @property
    def kept(self) -> int:
        return kept_count(self.channels, self.rate)

    def kept_indices(self) -> list[int]:
        rank = np.asarray(self.rank)
        return np.flatnonzero(rank < self.kept).tolist()


@dataclasses.dataclass(frozen=True)
class SubnetSpec:
    arch: str
    num_classes: int
    input_shape: tuple
    groups: dict  # name -> GroupState

    @classmethod
    def from_model(cls, model) -> "SubnetSpec":
        """The current sub-network of a gated clone."""
        groups = {g.name: GroupState(g.channels, float(g.rate), tuple(int(r) for r in g.rank))
                  for g in model.gate_groups}
        return cls(model.arch_name, model.num_classes, tuple(model.image_shape), groups)

    @property
    def rates(self) -> dict:
        return {name: g.rate for name, g in self.groups.items()}

    def check_fits(self, model) -> None:
        """ValueError unless the gated clone `model` has exactly this spec's groups."""
        names = [g.name for g in model.gate_groups]
        if sorted(names) != sorted(self.groups):
            missing = sorted(set(self.groups) - set(names))[:3]
            extra = sorted(set(names) - set(self.groups))[:3]
            raise UserError(
                f"the sub-network spec (of {self.arch}) does not fit {model.arch_name}: its "
                f"channel groups differ (spec only: {missing}, model only: {extra}); was it "
                "written for another model (or by an ekg_tf before 0.2, whose group names "
                "differ)?")
        for g in model.gate_groups:
            if self.groups[g.name].channels != g.channels:
                raise UserError(f"group {g.name!r}: spec has {self.groups[g.name].channels} "
                                 f"channels, model has {g.channels}")

    def apply_to(self, model) -> None:
        """Sets every gate group of `model` to this spec's rank and rate."""
        self.check_fits(model)
        for g in model.gate_groups:
            state = self.groups[g.name]
            g.rank = state.rank
            g.rate = state.rate

    def full_width(self) -> "SubnetSpec":
        """The same network with every channel kept (the unpruned reference)."""
        return dataclasses.replace(self, groups={
            name: dataclasses.replace(g, rate=1.0) for name, g in self.groups.items()})

    def to_dict(self) -> dict:
        return {"arch": self.arch, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape),
                "groups": {name: {"channels": g.channels, "rate": g.rate, "kept": g.kept,
                                  "rank": list(g.rank), "kept_indices": g.kept_indices()}
                           for name, g in self.groups.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "SubnetSpec":
        try:
            groups = {name: GroupState(int(g["channels"]), float(g["rate"]),
                                       tuple(int(r) for r in g["rank"]))
                      for name, g in d["groups"].items()}
            return cls(str(d["arch"]), int(d["num_classes"]), tuple(d["input_shape"]), groups)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"not a sub-network spec ({type(e).__name__}: {e})") from None

    def to_json(self, path: str) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_json(cls, path: str) -> "SubnetSpec":
        if not os.path.exists(path):
            raise UserError(f"sub-network spec {path!r} does not exist "
                                    "(run ekg-search first)")
        with open(path) as f:
            return cls.from_dict(json.load(f))
