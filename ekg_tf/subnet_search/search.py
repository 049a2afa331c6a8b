"""The EKG greedy sub-network search (spec section 4), durable and resumable.

Each step: score channels (Taylor through the gates, or L1 filter norms), re-rank,
mark candidate groups with trimmed Otsu on the removal sums, evaluate each
candidate (one coarse step of `max(1/C, search_step/uses)`, or the fine step that
lands at the MACs target), keep the best by the objective, fold its logits into
the knowledge `K`, write the state. Stops at MACs(sub)/MACs(full) <= target.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import tensorflow as tf

from ekg_tf.errors import UserError
from ekg_tf.flops import ComplexityCounter
from ekg_tf.subnet_search import scoring
from ekg_tf.subnet_search.evaluator import SubnetEvaluator
from ekg_tf.subnet_search.objective import (check_objective, evaluate_logits, knowledge_weight,
                                            reward_key, update_knowledge)
from ekg_tf.subnet_search.state import SearchState, load_state, save_state
from ekg_tf.subnet import SubnetSpec

IMPORTANCES = ("taylor", "l1")


@dataclasses.dataclass
class SearchSettings:
    target_ratio: float = 0.45
    search_step: float = 0.2
    objective: str = "ekg"
    importance: str = "taylor"
    max_steps: int = 1000
    otsu_cut: float = 0.2

    def __post_init__(self):
        if not 0.0 < float(self.target_ratio) < 1.0:
            raise UserError(f"search.target_ratio must be in (0, 1) (the fraction of MACs to "
                             f"keep, e.g. 0.45), got {self.target_ratio}")
        if not 0.0 < float(self.search_step) <= 1.0:
            raise UserError(f"search.search_step must be in (0, 1], got {self.search_step}")
        check_objective(self.objective)
        if self.importance not in IMPORTANCES:
            raise UserError(f"search.importance must be one of {IMPORTANCES}, "
                             f"got {self.importance!r}")
        if int(self.max_steps) < 0:
            raise UserError(f"search.max_steps must be >= 0, got {self.max_steps}")

    @classmethod
    def from_config(cls, search_cfg) -> "SearchSettings":
        return cls(target_ratio=float(search_cfg.target_ratio),
                   search_step=float(search_cfg.search_step),
                   objective=str(search_cfg.objective), importance=str(search_cfg.importance),
                   max_steps=int(search_cfg.max_steps))


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


class EKGSearch:
    """Greedy search over the gate rates of `model`, evaluated by `evaluator`.

    `search_dir` holds the durable state; `fingerprint` identifies the run (a saved
    state with another fingerprint is refused). `on_step(entry)` is called after each
    step is saved (tests stop a run there).
    """

    def __init__(self, model, evaluator, settings: SearchSettings, search_dir: str,
                 fingerprint: dict, log: Callable[[str], None] | None = None,
                 summary_writer=None, rng_state: dict | None = None):
        self.model = model
        self.evaluator = evaluator
        self.settings = settings
        self.search_dir = search_dir
        self.fingerprint = dict(fingerprint, target_ratio=settings.target_ratio,
                                search_step=settings.search_step, objective=settings.objective,
                                importance=settings.importance)
        self.log = log or (lambda msg: None)
        self.writer = summary_writer
        self.rng_state = rng_state or {}
        self.counter = ComplexityCounter(model.dependency)
        self.groups = list(model.gate_groups)
        self.steps = {g.name: scoring.step_size(g.channels, g.uses, settings.search_step)
                      for g in self.groups}
        self.fine_steps = {g.name: 1.0 / g.channels for g in self.groups}
        self.labels = evaluator.labels
        self._l1 = None

    # -- helpers
    def ratio_of(self, rates) -> float:
        return self.counter.macs_ratio(rates)

    def _params_ratio(self, rates) -> float:
        return self.counter.count(rates).params / self.counter.full.params

    def _apply(self, rates: dict, ranks: dict | None = None):
        for g in self.groups:
            if ranks is not None:
                g.rank = ranks[g.name]
            g.rate = scoring.clamp_rate(rates[g.name])

    def _entry(self, step, rates, metrics, group=None, candidates=0, seconds=0.0):
        return {"step": step, "group": group, "candidates": int(candidates),
                "seconds": float(seconds),
                "macs_ratio": self.ratio_of(rates), "params_ratio": self._params_ratio(rates),
                "loss": metrics["loss"], "objective": metrics["objective"],
                "accuracy": metrics["accuracy"],
                "rates": {g.name: float(rates[g.name]) for g in self.groups},
                "ranks": {g.name: [int(r) for r in g.rank] for g in self.groups}}

    def _summaries(self, entry):
        if self.writer is None:
            return
        with self.writer.as_default():
            for key in ("macs_ratio", "params_ratio", "loss", "objective", "accuracy",
                        "candidates", "seconds"):
                tf.summary.scalar(f"search/{key}", entry[key], step=entry["step"])
        self.writer.flush()

    def check_reachable(self):
        floor = self.ratio_of({g.name: 0.0 for g in self.groups})
        if floor > self.settings.target_ratio:
            raise UserError(
                f"search.target_ratio {self.settings.target_ratio} is unreachable: with every "
                f"gate at its minimum width (one channel) {self.model.arch_name} keeps "
                f"{floor:.4f} of its MACs; choose a target above that")

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
        target = self.settings.target_ratio
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
            self.log(f"step {entry['step']}: {entry['group']} -> {rates[entry['group']]:.4f} "
                     f"({entry['candidates']} candidates, {entry['seconds']:.1f} s), MACs ratio "
                     f"{entry['macs_ratio']:.4f}, loss {entry['loss']:.4f}, "
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
                            - self.traces_after_warmup)

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
        sums = [scoring.removal_sum(scores[g.name], rates[g.name], self.steps[g.name])
                for g in self.groups]
        marked = scoring.mark_candidates(sums, s.otsu_cut)
        if not marked.any():
            raise UserError(
                f"search.target_ratio {s.target_ratio} is unreachable: every gate is at its "
                f"minimum width and the MACs ratio is still {self.ratio_of(rates):.4f}")
        best = None
        for g, is_candidate in zip(self.groups, marked):
            if not is_candidate:
                continue
            rate = scoring.candidate_rate(self.ratio_of, rates, g.name, self.steps[g.name],
                                          self.fine_steps[g.name], s.search_step,
                                          s.target_ratio)
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
                      summary_writer=None, rng_state: dict | None = None, on_step=None):
    """Runs (or resumes from `search_dir`) the EKG search of a gated clone on the validation
    images; returns (SearchResult, the evaluator). The model ends at the found sub-network."""
    evaluator = SubnetEvaluator(model, images, labels, batch_size, strategy=strategy,
                                knowledge_weight=knowledge_weight(settings.objective),
                                cache_prefix=cache_prefix, forward=forward)
    search = EKGSearch(model, evaluator, settings, search_dir, fingerprint or {}, log=log,
                       summary_writer=summary_writer, rng_state=rng_state)
    return search.run(on_step=on_step), evaluator
