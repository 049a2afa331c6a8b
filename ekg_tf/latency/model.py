"""Latency of any sub-network on a deployment runtime, predicted from timed blocks.

`LatencyModel(gated, runtime, batch)` cuts the traced model into blocks
(`segments.segment_graph`), times every distinct block at a grid of its groups' widths
on the machine at hand (each block alone, converted and run as the export ships it:
BN folded, float32, `Runtime.session`), caches the times (`LatencyTable`), and times
whole deployed networks: the unpruned one, the narrowest one (every group at its
smallest width) and `calibration_networks` random sub-networks (every group at a
uniformly drawn width, seeded), each the median of `ANCHOR_TIMINGS` timings. A
sub-network's predicted latency is

    intercept + slope * blocks(sub),

`blocks(.)` being the sum over blocks of the table at their groups' kept widths
(multilinear between grid points), and (intercept, slope) the least-squares line
through the measured networks' (blocks, ms). The map removes what timing a block alone
adds (one invocation per block instead of one per network; the boundary copies and
layout conversions a runtime makes at a model's input and output), which a per-block
sum would count about thirty times over. A line through measured sub-networks rather
than through the unpruned and the narrowest network alone: in onnxruntime the unpruned
ResNet-56 (every width a multiple of the 16-channel NCHWc block) lies off the line of
its pruned networks, and a map anchored on it predicted a searched network 19% slow.
The kept widths are `gates.kept_count` at each group's `round_to`, the widths every other part sees, so with aligned widths
(round_to 8 or 16) the grid is the aligned widths themselves (up to `max_cells` cells
per block) and nothing is interpolated.

Interference on a shared machine only adds time: a cell slower by more than 10% than a
cell of its block with every group at least as wide is timed again (twice at most) and
keeps its fastest median (`slow_cells`); a width a runtime genuinely runs slower stays.
Build the table on a quiet machine: a table timed under load predicts that load (on
this machine a table built beside other jobs had a dense network of 3.84 ms against
1.5 ms quiet).

    model = LatencyModel(gated, Runtime("tflite", threads=2), batch=1)
    model.predict_ms(rates)      # ms
    model.ratio(rates)           # predicted / measured unpruned latency (not 1 at the
                                 # unpruned network itself: it is one point of the fit)
"""
from __future__ import annotations

import itertools
import math
import time

import numpy as np

from ekg_tf.flops import group_round_to
from ekg_tf.graph.gates import aligned_widths, kept_count
from ekg_tf.latency import segments as segments_lib
from ekg_tf.latency.runtimes import Runtime, time_alone
from ekg_tf.latency.table import LatencyTable

MAX_POINTS = 9        # grid points per group and block at most
MAX_CELLS = 256       # cells (width combinations) per block at most
RETIME_TOLERANCE = 0.10  # a cell this much slower than a wider one of its block is re-timed
RETIME_PASSES = 2
# The whole networks the predictions are fitted on are each timed this many times (a
# fresh session each) and keep the median: one timing of the unpruned ResNet-56 in
# TFLite lands now and then in a mode 15-18% slower (1.57-1.59 ms against 1.34-1.36 ms
# here), and it divides every predicted ratio. Not the fastest: it sits below what a
# deployed session typically measures (1.31 against 1.37-1.40 ms), and predictions
# anchored on it were 11% fast (median over 24 sub-networks).
ANCHOR_TIMINGS = 3
CALIBRATION_NETWORKS = 10  # random sub-networks the map is fitted on (with the two above)


def group_grid(channels: int, round_to: int, points: int) -> list[int]:
    """At most `points` widths from the group's aligned widths, always with the smallest
    and the full width, evenly spaced in aligned units."""
    widths = aligned_widths(channels, round_to)
    if round_to == 1:
        widths = [1] + widths[1:]
    if len(widths) <= points:
        return widths
    picks = np.linspace(0, len(widths) - 1, points).round().astype(int)
    return sorted({widths[i] for i in picks})


def segment_grids(channels: list, round_to: list, max_points: int = MAX_POINTS,
                  max_cells: int = MAX_CELLS) -> list[list[int]]:
    """Grids of a block's groups: each at most `max_points`, their product at most
    `max_cells` (the widest grids are thinned first)."""
    points = [min(max_points, len(aligned_widths(c, r))) for c, r in zip(channels, round_to)]
    while math.prod(points) > max_cells and max(points) > 2:
        i = int(np.argmax(points))
        points[i] -= 1
    return [group_grid(c, r, p) for c, r, p in zip(channels, round_to, points)]


def _bracket(grid: list, w: float) -> list[tuple[int, float]]:
    """[(grid index, weight)] interpolating width `w` linearly on `grid` (clamped)."""
    if w <= grid[0]:
        return [(0, 1.0)]
    if w >= grid[-1]:
        return [(len(grid) - 1, 1.0)]
    hi = int(np.searchsorted(grid, w))
    if grid[hi] == w:
        return [(hi, 1.0)]
    lo = hi - 1
    t = (w - grid[lo]) / (grid[hi] - grid[lo])
    return [(lo, 1.0 - t), (hi, t)]


class LatencyModel:
    """Predicted latency of sub-networks of a gated clone (see the module docstring).

    `round_to`: as `ComplexityCounter` (default: the gated clone's groups'). `build`:
    time what the cache lacks now (else `missing()` says what is absent and a
    prediction needing it raises). `progress`: a `ProgressBar`-like object.
    """

    def __init__(self, gated, runtime: Runtime, batch: int = 1, cache_dir: str | None = None,
                 round_to=None, max_cells: int = MAX_CELLS, build: bool = True,
                 progress=None, runs: int = 20, log=None,
                 calibration_networks: int = CALIBRATION_NETWORKS):
        self.gated = gated
        self.dependency = gated.dependency
        self.runtime = runtime
        self.batch = int(batch)
        self.table = LatencyTable(runtime, batch, cache_dir)
        self.runs = int(runs)
        self.log = log or (lambda msg: None)
        groups = list(self.dependency.groups)
        self.group_names = [g.name for g in groups]
        self.channels = {g.name: g.channels for g in groups}
        self.round_to = group_round_to(gated, round_to)
        self.segments = segments_lib.segment_graph(self.dependency)
        self.grids = [segment_grids([self.channels[g] for g in s.groups],
                                    [self.round_to[g] for g in s.groups], max_cells=max_cells)
                      for s in self.segments]
        self.network_key = self._network_key()
        self.calibration_rates = [self._random_rates(seed)
                                  for seed in range(calibration_networks)]
        self._calibration = None
        if build:
            self.build(progress)

    # -- what to time
    def _network_key(self) -> str:
        shape = tuple(self.dependency.graph.tensors[self.dependency.graph.inputs[0]].shape)
        # "anchors": how whole networks are timed (a table of single timings re-times them)
        return f"{self.dependency.graph.name}|{shape}|anchors:median{ANCHOR_TIMINGS}|" + ",".join(
            s.signature for s in self.segments)

    def _narrowest_rates(self) -> dict:
        return {n: 0.0 for n in self.group_names}

    def _narrowest_key(self) -> str:
        return self._widths_key(self._narrowest_rates(), "narrowest")

    def _widths_key(self, rates: dict, what: str) -> str:
        kept = self.kept(rates)
        return f"{self.network_key}|{what}:" + ",".join(str(kept[n]) for n in self.group_names)

    def _random_rates(self, seed: int) -> dict:
        """A calibration sub-network: every group at a uniformly drawn aligned width."""
        rng = np.random.default_rng(seed)
        return {n: float(rng.choice(aligned_widths(self.channels[n], self.round_to[n])))
                / self.channels[n] for n in self.group_names}

    def _networks(self) -> list[tuple[str, dict]]:
        """(table key, rates) of every measured network: dense, narrowest, the random ones."""
        return ([(self.network_key, {}), (self._narrowest_key(), self._narrowest_rates())]
                + [(self._widths_key(r, "random"), r) for r in self.calibration_rates])

    def cells(self) -> list[tuple]:
        """Every (segment, widths) the predictions read, one per distinct block signature."""
        out, seen = [], set()
        for segment, grid in zip(self.segments, self.grids):
            for widths in itertools.product(*grid):
                key = (segment.signature, widths)
                if key not in seen:
                    seen.add(key)
                    out.append((segment, widths))
        return out

    def missing(self) -> list[tuple]:
        """What the table lacks: (segment, widths) cells, then ("network", table key)."""
        cells = [(s, w) for s, w in self.cells() if self.table.cell(s.signature, w) is None]
        return cells + [("network", key) for key, _ in self._networks()
                        if key not in self.table.networks]

    # -- timing
    def _time_cell(self, segment, widths) -> float:
        kept = dict(zip(segment.groups, widths))
        return self.time_network(segments_lib.segment_model(self.dependency, segment, kept))

    def time_network(self, model) -> float:
        """Measured latency (median ms) of a plain deployed (BN-folded) Keras model."""
        shape = (self.batch, *(int(d) for d in model.inputs[0].shape[1:]))
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        session = self.runtime.session(model)
        return time_alone([lambda: session], x, runs=self.runs)[0]

    def time_anchor(self, model) -> float:
        """The median of `ANCHOR_TIMINGS` timings of a whole network, each in a fresh
        session (one session's slow mode does not move it)."""
        return float(np.median([self.time_network(model) for _ in range(ANCHOR_TIMINGS)]))

    def network(self, rates: dict):
        """The sub-network at `rates` ({group: rate}; absent = 1) as deployed (slimmed,
        BN folded)."""
        from ekg_tf.slimming import fold_batch_norm, slim_model
        from ekg_tf.subnet import GroupState, SubnetSpec
        base = SubnetSpec.from_model(self.gated)
        spec = SubnetSpec(base.arch, base.num_classes, base.input_shape, {
            n: GroupState(g.channels, rates.get(n, 1.0), g.rank, self.round_to[n])
            for n, g in base.groups.items()})
        return fold_batch_norm(slim_model(self.gated, spec))

    def build(self, progress=None) -> int:
        """Times every missing cell (and the unpruned network); returns how many."""
        todo = self.missing()
        if not todo:
            return 0
        self.log(f"latency table {self.table.path}: timing {len(todo)} block/width cells on "
                 f"{self.runtime.label}, batch {self.batch}")
        t0, last_save = time.time(), time.time()
        networks = dict(self._networks())  # table key -> rates
        for i, (segment, widths) in enumerate(todo):
            if segment == "network":  # `widths` is the network's table key
                self.table.networks[widths] = self.time_anchor(self.network(networks[widths]))
            else:
                self.table.put_cell(segment.signature, widths, self._time_cell(segment, widths))
            if progress is not None:
                progress.update(1)
            if time.time() - last_save > 20:
                self.table.save()
                last_save = time.time()
        self.table.save()
        self.retime_slow_cells()
        self._calibration = None
        self.log(f"latency table: {len(todo)} cells timed in {time.time() - t0:.0f} s")
        return len(todo)

    def slow_cells(self, tolerance: float = RETIME_TOLERANCE) -> list[tuple]:
        """(segment, widths) cells slower by more than `tolerance` than a cell of the same
        block with every group at least as wide. Interference on a shared machine only
        adds time, so these are mostly disturbed timings (a runtime's genuinely slow
        width, e.g. one outside its channel blocks, stays slow when timed again)."""
        by_block = {}
        for segment, widths in self.cells():
            ms = self.table.cell(segment.signature, widths)
            if ms is not None:
                by_block.setdefault(segment.signature, []).append((segment, widths, ms))
        slow = []
        for cells in by_block.values():
            for segment, widths, ms in cells:
                fastest_wider = min(other for _, w, other in cells
                                    if all(a >= b for a, b in zip(w, widths)))
                if ms > (1.0 + tolerance) * fastest_wider:
                    slow.append((segment, widths))
        return slow

    def retime_slow_cells(self) -> int:
        """Times `slow_cells` again (up to RETIME_PASSES times); each keeps its fastest
        median. Returns how many timings that took."""
        count = 0
        for _ in range(RETIME_PASSES):
            slow = self.slow_cells()
            if not slow:
                break
            for segment, widths in slow:
                ms = self._time_cell(segment, widths)
                self.table.put_cell(segment.signature, widths,
                                    min(ms, self.table.cell(segment.signature, widths)))
                count += 1
            self.table.save()
        if count:
            self.log(f"latency table: {count} timings again of cells slower than a wider "
                     f"cell of their block; {len(self.slow_cells())} still are")
        return count

    # -- prediction
    def _segment_ms(self, index: int, widths) -> float:
        segment, grid = self.segments[index], self.grids[index]
        total = 0.0
        for corner in itertools.product(*(_bracket(g, w) for g, w in zip(grid, widths))):
            point = tuple(grid[k][i] for k, (i, _) in enumerate(corner))
            ms = self.table.cell(segment.signature, point)
            if ms is None:
                raise KeyError(f"latency table {self.table.path} lacks block {segment.name} at "
                               f"widths {point}; build the table first (LatencyModel(..., "
                               f"build=True))")
            total += ms * math.prod(wt for _, wt in corner)
        return total

    def kept(self, rates) -> dict:
        return {n: kept_count(self.channels[n], rates.get(n, 1.0), self.round_to[n])
                for n in self.group_names}

    def blocks_ms(self, rates) -> float:
        """Sum of the blocks' table latencies at `rates` (uncalibrated)."""
        return self.blocks_kept(self.kept(rates))

    def blocks_kept(self, kept: dict) -> float:
        return sum(self._segment_ms(i, [kept[g] for g in s.groups])
                   for i, s in enumerate(self.segments))

    def _measured(self, key: str, what: str) -> float:
        try:
            return self.table.networks[key]
        except KeyError:
            raise KeyError(f"latency table {self.table.path} lacks the {what} network; build "
                           "the table first (LatencyModel(..., build=True))") from None

    @property
    def dense_ms(self) -> float:
        """Measured latency of the unpruned deployed network."""
        return self._measured(self.network_key, "unpruned")

    @property
    def narrowest_ms(self) -> float:
        """Measured latency of the narrowest deployed network (every group at its minimum)."""
        return self._measured(self._narrowest_key(), "narrowest")

    def calibration(self) -> tuple[float, float]:
        """(intercept, slope) of the least-squares line from block sums onto the measured
        networks' latencies."""
        if self._calibration is None:
            points = [(self.blocks_ms(rates), self._measured(key, "calibration"))
                      for key, rates in self._networks()]
            blocks, ms = np.array(points).T
            if np.ptp(blocks) > 0:
                slope, intercept = np.polyfit(blocks, ms, 1)
            else:  # one width per group: nothing to fit
                slope, intercept = 1.0, float(ms.mean() - blocks.mean())
            self._calibration = (float(intercept), float(slope))
        return self._calibration

    def predict_ms(self, rates) -> float:
        """Predicted latency (ms) of the sub-network at `rates` ({group: rate}; absent = 1)."""
        intercept, slope = self.calibration()
        return intercept + slope * self.blocks_ms(rates)

    def ratio(self, rates) -> float:
        return self.predict_ms(rates) / self.dense_ms

    def describe(self) -> dict:
        return {**self.runtime.describe(), "batch": self.batch, "table": self.table.path,
                "blocks": len(self.segments),
                "distinct_blocks": len({s.signature for s in self.segments}),
                "cells": len(self.cells()),
                "dense_ms": self.table.networks.get(self.network_key),
                "narrowest_ms": self.table.networks.get(self._narrowest_key()),
                "fitted_networks": len(self._networks()),
                # ms = intercept + slope * block sum: [intercept, slope]
                "calibration_line": None if self.missing() else list(self.calibration())}



def search_latency_model(settings, gated, cache_dir: str = "", max_cells: int = MAX_CELLS,
                         log=None):
    """The latency model a search with `settings` (`SearchSettings`) reads, timing what the
    cache lacks (with a progress bar); None for a MACs target."""
    if settings.target_metric != "latency":
        return None
    from ekg_tf.utils.progress import ProgressBar
    model = LatencyModel(gated, settings.runtime_spec, settings.latency_batch,
                         cache_dir or None, round_to=settings.round_to, max_cells=max_cells,
                         build=False, log=log)
    todo = len(model.missing())
    if todo:
        bar = ProgressBar(todo, desc=f"latency table ({settings.runtime_spec.label})",
                          unit="cell")
        model.build(bar)
        bar.close()
    return model


ARTIFACTS = {"tflite": "tflite_float32", "onnxruntime": "onnx"}  # export report names


def cached_predictions(gated, spec, threads: int, batches=(1, 32), cache_dir: str = "",
                       max_cells: int = MAX_CELLS) -> dict:
    """Predicted latency (ms) of `spec` and of the unpruned network from the tables already
    cached (nothing is timed): {artifact: {"batch1": {"predicted_ms", "dense_ms", "table"}}}
    for every runtime and batch whose table covers them (the export report)."""
    out = {}
    for name, artifact in ARTIFACTS.items():
        for batch in batches:
            model = LatencyModel(gated, Runtime(name, threads), batch, cache_dir or None,
                                 round_to=spec.round_to, max_cells=max_cells, build=False)
            if model.missing():
                continue
            out.setdefault(artifact, {})[f"batch{batch}"] = {
                "predicted_ms": model.predict_ms(spec.rates), "dense_ms": model.dense_ms,
                "predicted_ratio": model.ratio(spec.rates), "table": model.table.path}
    return out
