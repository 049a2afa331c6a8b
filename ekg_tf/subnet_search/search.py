"""The EKG greedy sub-network search (spec section 4), durable and resumable.

Each step: score channels (Taylor through the gates, or L1 filter norms), re-rank,
mark candidate groups with trimmed Otsu on the removal sums, evaluate each
candidate (one coarse step of `max(1/C, search_step/uses)`, or the fine step that
lands at the target), keep the best by the objective, fold its logits into
the knowledge `K`, write the state. Stops at metric(sub)/metric(full) <= target, the
metric being MACs (the reference) or the latency a `LatencyModel` predicts on a
deployment runtime (`target_metric="latency"`; the objective stays EKG's).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import tensorflow as tf

from ekg_tf.errors import UserError
from ekg_tf.flops import ComplexityCounter
from ekg_tf.graph.gates import aligned_rate, check_round_to
from ekg_tf.subnet_search import scoring
from ekg_tf.subnet_search.evaluator import SubnetEvaluator
from ekg_tf.subnet_search.objective import (check_objective, evaluate_logits, knowledge_weight,
                                            reward_key, update_knowledge)
from ekg_tf.subnet_search.state import SearchState, load_state, save_state
from ekg_tf.subnet import SubnetSpec

IMPORTANCES = ("taylor", "l1")
TARGET_METRICS = ("macs", "latency")


@dataclasses.dataclass
class SearchSettings:
    target_ratio: float = 0.45
    search_step: float = 0.2
    objective: str = "ekg"
    importance: str = "taylor"
    max_steps: int = 1000
    otsu_cut: float = 0.2
    round_to: int = 1           # kept widths: multiples of this (or a group's full width)
    target_metric: str = "macs"  # macs | latency (predicted on `runtime`)
    target_ms: float = 0.0      # > 0: latency target in ms instead of target_ratio
    runtime: str = "tflite"     # the latency target's runtime (ekg_tf.latency.RUNTIMES)
    runtime_threads: int = 2
    latency_batch: int = 1

    def __post_init__(self):
        from ekg_tf.latency.runtimes import Runtime
        if self.target_metric not in TARGET_METRICS:
            raise UserError(f"search.target_metric must be one of {TARGET_METRICS}, got "
                             f"{self.target_metric!r}")
        if not 0.0 < float(self.target_ratio) < 1.0:
            raise UserError(f"search.target_ratio must be in (0, 1) (the fraction of "
                             f"{'MACs' if self.target_metric == 'macs' else 'latency'} to "
                             f"keep, e.g. 0.45), got {self.target_ratio}")
        if float(self.target_ms) < 0 or (self.target_ms and self.target_metric != "latency"):
            raise UserError(f"search.target_ms must be >= 0 and needs "
                             f"search.target_metric=latency, got {self.target_ms} with "
                             f"target_metric={self.target_metric!r}")
        self.runtime_spec = Runtime(self.runtime, self.runtime_threads)  # validates both
        if isinstance(self.latency_batch, bool) or int(self.latency_batch) < 1:
            raise UserError(f"search.latency_batch must be >= 1, got {self.latency_batch}")
        if not 0.0 < float(self.search_step) <= 1.0:
            raise UserError(f"search.search_step must be in (0, 1], got {self.search_step}")
        check_objective(self.objective)
        if self.importance not in IMPORTANCES:
            raise UserError(f"search.importance must be one of {IMPORTANCES}, "
                             f"got {self.importance!r}")
        if int(self.max_steps) < 0:
            raise UserError(f"search.max_steps must be >= 0, got {self.max_steps}")
        self.round_to = check_round_to(self.round_to, ())

    def fingerprint(self) -> dict:
        """What a resumed search must share with the saved one."""
        out = {"target_ratio": self.target_ratio, "search_step": self.search_step,
               "objective": self.objective, "importance": self.importance}
        if self.round_to != 1:  # absent for 1: states written before round_to still resume
            out["round_to"] = self.round_to
        if self.target_metric == "latency":
            out.update(target_metric="latency", target_ms=float(self.target_ms),
                       runtime=self.runtime, runtime_threads=int(self.runtime_threads),
                       latency_batch=int(self.latency_batch))
        return out

    @classmethod
    def from_config(cls, search_cfg) -> "SearchSettings":
        return cls(target_ratio=float(search_cfg.target_ratio),
                   search_step=float(search_cfg.search_step),
                   objective=str(search_cfg.objective), importance=str(search_cfg.importance),
                   max_steps=int(search_cfg.max_steps),
                   round_to=search_cfg.get("round_to", 1),
                   target_metric=str(search_cfg.get("target_metric", "macs")),
                   target_ms=float(search_cfg.get("target_ms", 0.0)),
                   runtime=str(search_cfg.get("runtime", "tflite")),
                   runtime_threads=search_cfg.get("runtime_threads", 2),
                   latency_batch=search_cfg.get("latency_batch", 1))


@dataclasses.dataclass
class SearchResult:
    spec: SubnetSpec
    history: list
    done: bool
    steps: int
    search_seconds: float
    macs_ratio: float
    params_ratio: float
    val_loss: float
    val_top1: float
    retraces_after_warmup: int = 0
    target: float = 0.0                 # the target ratio of `metric`
    metric: str = "macs"
    latency_ms: float | None = None     # predicted (a latency model was given)
    latency_ratio: float | None = None
    dense_latency_ms: float | None = None


class EKGSearch:
    """Greedy search over the gate rates of `model`, evaluated by `evaluator`.

    `search_dir` holds the durable state; `fingerprint` identifies the run (a saved
    state with another fingerprint is refused). `on_step(entry)` is called after each
    step is saved (tests stop a run there). `latency_model` (an
    `ekg_tf.latency.LatencyModel`): the predicted latency of every step is recorded, and
    with `target_metric="latency"` it is what the target is a fraction of.
    """

    def __init__(self, model, evaluator, settings: SearchSettings, search_dir: str,
                 fingerprint: dict, log: Callable[[str], None] | None = None,
                 summary_writer=None, rng_state: dict | None = None, latency_model=None):
        self.model = model
        self.evaluator = evaluator
        self.settings = settings
        self.search_dir = search_dir
        self.fingerprint = dict(fingerprint, **settings.fingerprint())
        self.log = log or (lambda msg: None)
        self.writer = summary_writer
        self.rng_state = rng_state or {}
        model.set_round_to(settings.round_to)  # the widths every part below counts
        self.counter = ComplexityCounter(model)
        self.groups = list(model.gate_groups)
        self.steps = {g.name: scoring.step_size(g.channels, g.uses, settings.search_step,
                                                g.round_to) for g in self.groups}
        self.fine_steps = {g.name: scoring.fine_step(g.channels, g.round_to)
                           for g in self.groups}
        self.labels = evaluator.labels
        self._l1 = None
        self.latency = latency_model
        self.target = self._target()

    def _target(self) -> float:
        s = self.settings
        if s.target_metric == "macs":
            return s.target_ratio
        if self.latency is None:
            raise UserError("search.target_metric=latency needs a latency model "
                             "(ekg_tf.latency.LatencyModel of search.runtime)")
        if not s.target_ms:
            return s.target_ratio
        dense = self.latency.dense_ms
        if not 0 < s.target_ms < dense:
            raise UserError(f"search.target_ms={s.target_ms} must be below the unpruned "
                             f"network's {dense:.3f} ms on {self.latency.runtime.label} "
                             f"(batch {self.latency.batch})")
        return s.target_ms / dense

    # -- helpers
    def ratio_of(self, rates) -> float:
        """The target metric's ratio to the unpruned network."""
        if self.settings.target_metric == "latency":
            return self.latency.ratio(rates)
        return self.counter.macs_ratio(rates)

    def _params_ratio(self, rates) -> float:
        return self.counter.count(rates).params / self.counter.full.params

    def _apply(self, rates: dict, ranks: dict | None = None):
        for g in self.groups:
            if ranks is not None:
                g.rank = ranks[g.name]
            g.rate = scoring.clamp_rate(rates[g.name])

    def _entry(self, step, rates, metrics, group=None, candidates=0, seconds=0.0):
        latency = {} if self.latency is None else {
            "latency_ms": self.latency.predict_ms(rates),
            "latency_ratio": self.latency.ratio(rates)}
        return {"step": step, "group": group, "candidates": int(candidates),
                "seconds": float(seconds), **latency,
                "macs_ratio": self.counter.macs_ratio(rates),
                "params_ratio": self._params_ratio(rates),
                "loss": metrics["loss"], "objective": metrics["objective"],
                "accuracy": metrics["accuracy"],
                "rates": {g.name: float(rates[g.name]) for g in self.groups},
                "ranks": {g.name: [int(r) for r in g.rank] for g in self.groups}}

    def _summaries(self, entry):
        if self.writer is None:
            return
        with self.writer.as_default():
            for key in ("macs_ratio", "params_ratio", "loss", "objective", "accuracy",
                        "candidates", "seconds", "latency_ms", "latency_ratio"):
                if key in entry:
                    tf.summary.scalar(f"search/{key}", entry[key], step=entry["step"])
        self.writer.flush()

    def check_reachable(self):
        floor = self.ratio_of({g.name: 0.0 for g in self.groups})
        if floor > self.target:
            what = "MACs" if self.settings.target_metric == "macs" else "predicted latency"
            raise UserError(
                f"search target {self.target:.4f} is unreachable: with every gate at its "
                f"minimum width ({self.settings.round_to} channel(s)) {self.model.arch_name} "
                f"keeps {floor:.4f} of its {what}; choose a target above that")

    # -- the loop
    def initial_state(self) -> SearchState:
        for g in self.groups:
            g.rank = np.arange(g.channels)
            g.rate = 1.0
        logits = self.evaluator.refresh()
        knowledge = logits.astype(np.float32)
        metrics = evaluate_logits(logits, self.labels, knowledge)
        rates = {g.name: 1.0 for g in self.groups}
        entry = self._entry(0, rates, metrics)
        return SearchState(self.fingerprint, [entry], knowledge, 1, self.rng_state)

    def run(self, on_step: Callable[[dict], None] | None = None) -> SearchResult:
        self.check_reachable()
        state = load_state(self.search_dir, self.fingerprint)
        if state is None:
            state = self.initial_state()
            save_state(self.search_dir, state)
            self._summaries(state.history[0])
            self.log(f"step 0: unpruned, val loss {state.history[0]['loss']:.4f}, "
                     f"top-1 {state.history[0]['accuracy']:.4f}")
        else:
            self.log(f"resuming the search at step {state.step} ({self.search_dir})")
        last = state.history[-1]
        rates = dict(last["rates"])
        self._apply(rates, last["ranks"])
        self.evaluator.warm_up(state.knowledge)
        self.traces_after_warmup = self.evaluator.trace_count
        target = self.target
        while (not state.done and self.ratio_of(rates) > target
               and state.step < self.settings.max_steps):
            t0 = time.time()
            rates, entry, logits = self._step(state.step + 1, rates, state.knowledge)
            state.history.append(entry)
            state.knowledge, state.knowledge_count = update_knowledge(
                state.knowledge, state.knowledge_count, logits)
            state.elapsed_seconds += time.time() - t0
            state.done = self.ratio_of(rates) <= target
            save_state(self.search_dir, state)
            self._summaries(entry)
            latency = (f", predicted latency {entry['latency_ms']:.3f} ms "
                       f"({entry['latency_ratio']:.4f})" if "latency_ms" in entry else "")
            self.log(f"step {entry['step']}: {entry['group']} -> {rates[entry['group']]:.4f} "
                     f"({entry['candidates']} candidates, {entry['seconds']:.1f} s), MACs ratio "
                     f"{entry['macs_ratio']:.4f}{latency}, loss {entry['loss']:.4f}, "
                     f"objective {entry['objective']:.4f}, top-1 {entry['accuracy']:.4f}")
            if on_step is not None:
                on_step(entry)
        if not state.done and self.ratio_of(rates) <= target:
            state.done = True
            save_state(self.search_dir, state)
        last = state.history[-1]
        return SearchResult(spec=SubnetSpec.from_model(self.model), history=state.history,
                            done=state.done, steps=state.step,
                            search_seconds=state.elapsed_seconds,
                            macs_ratio=last["macs_ratio"], params_ratio=last["params_ratio"],
                            val_loss=last["loss"], val_top1=last["accuracy"],
                            retraces_after_warmup=self.evaluator.trace_count
                            - self.traces_after_warmup, target=self.target,
                            metric=self.settings.target_metric,
                            latency_ms=last.get("latency_ms"),
                            latency_ratio=last.get("latency_ratio"),
                            dense_latency_ms=None if self.latency is None
                            else self.latency.dense_ms)

    def _scores(self, knowledge):
        if self.settings.importance == "l1":
            if self._l1 is None:
                self._l1 = scoring.l1_filter_scores(self.model)
            # pruned channels score 0, as under Taylor scoring (they stay at the bottom)
            return {g.name: self._l1[g.name] * g.mask() for g in self.groups}
        scores, _ = self.evaluator.score(knowledge)
        return scores

    def _step(self, step, rates, knowledge):
        t0 = time.time()
        s = self.settings
        scores = self._scores(knowledge)
        for g in self.groups:
            g.set_rank_from_score(scores[g.name])
        self.evaluator.refresh_if_changed()  # new ranks may change the masks
        sums = [scoring.removal_sum(scores[g.name], rates[g.name], self.steps[g.name],
                                    g.round_to) for g in self.groups]
        marked = scoring.mark_candidates(sums, s.otsu_cut)
        if not marked.any():
            raise UserError(
                f"search target {self.target:.4f} is unreachable: every gate is at its "
                f"minimum width and the {s.target_metric} ratio is still "
                f"{self.ratio_of(rates):.4f}")
        best = None
        for g, is_candidate in zip(self.groups, marked):
            if not is_candidate:
                continue
            rate = aligned_rate(g.channels, scoring.candidate_rate(
                self.ratio_of, rates, g.name, self.steps[g.name], self.fine_steps[g.name],
                s.search_step, self.target), g.round_to)
            old = g.rate
            g.rate = rate
            logits = self.evaluator.evaluate(g.name)
            g.rate = old
            metrics = evaluate_logits(logits, self.labels, knowledge)
            key = reward_key(metrics, s.objective)
            if best is None or key < best[0]:
                best = (key, g, rate, logits, metrics)
        _, g, rate, logits, metrics = best
        rates = dict(rates)
        rates[g.name] = rate
        g.rate = scoring.clamp_rate(rate)
        entry = self._entry(step, rates, metrics, group=g.name, candidates=int(marked.sum()),
                            seconds=time.time() - t0)
        return rates, entry, logits


def search_subnetwork(model, images, labels, settings: SearchSettings, search_dir: str, *,
                      strategy=None, batch_size: int = 256, forward: str = "sliced",
                      cache_prefix: bool = True, fingerprint: dict | None = None, log=None,
                      summary_writer=None, rng_state: dict | None = None, on_step=None,
                      latency_model=None):
    """Runs (or resumes from `search_dir`) the EKG search of a gated clone on the validation
    images; returns (SearchResult, the evaluator). The model ends at the found sub-network.
    `latency_model`: see `EKGSearch` (needed for `target_metric="latency"`)."""
    evaluator = SubnetEvaluator(model, images, labels, batch_size, strategy=strategy,
                                knowledge_weight=knowledge_weight(settings.objective),
                                cache_prefix=cache_prefix, forward=forward)
    search = EKGSearch(model, evaluator, settings, search_dir, fingerprint or {}, log=log,
                       summary_writer=summary_writer, rng_state=rng_state,
                       latency_model=latency_model)
    return search.run(on_step=on_step), evaluator
