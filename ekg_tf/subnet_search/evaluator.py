"""Compiled evaluation of sub-networks on the validation set (the search's hot loop).

`SubnetEvaluator(gated, images, labels, batch_size, strategy, forward=...)` scores and
evaluates the current sub-network of a gated clone with one forward strategy:
- `sliced` (default): the sub-network at its real width (`SlicedForward`): cost in
  proportion to its MACs; kept indices are arguments, so one trace serves all widths;
- `masked`: the full-width network with masks (`MaskedForward`).
Both run under the `tf.distribute` strategy: each validation batch is split over
the replicas and BN uses the statistics of the global batch, so N replicas compute
what one device computes.

Speed (the reference re-runs the whole network per candidate, batch by batch):
- a candidate changes one gate group, so everything before the first layer that
  touches that group is the current sub-network's: the tensors live there are taken
  from a cache that the scoring pass of the step fills anyway (one compiled function
  per starting layer, traced once in `warm_up`);
- a candidate is one call for the whole validation set; `trace_counts` counts traces
  so benchmarks and tests can check there is no retracing after warm-up.

Scoring: the Taylor score of a gate use is `|sum_{b,h,w} dL/dy * y|` with `y` the
gated tensor. The signed sums are all-reduced over replicas *before* the absolute
value, so the scores of N replicas equal those of one device. BN runs with batch
statistics and frozen moving statistics, as the reference.
"""
from __future__ import annotations

from ekg_tf.errors import UserError
import collections

import keras
import numpy as np
import tensorflow as tf

from ekg_tf.distribute import any_batch_spec, relaxed_spec
from ekg_tf.graph.rules import BatchNormStep
from ekg_tf.train.precision import check_precision, compute_precision
from ekg_tf.subnet_search.objective import objective_sum_tf

FORWARDS = ("sliced", "masked")


def first_nodes(dependency) -> dict:
    """Group name -> index of the first node that reads or writes its channels."""
    first = {}
    for node in dependency.graph.nodes:
        for tid in node.inputs + node.outputs:
            for key in dependency.layouts[tid].keys():
                if key is not None:
                    first.setdefault(key, node.index)
    return first


class SubnetEvaluator:
    """Scores and evaluates sub-networks of a gated clone on a fixed validation set.

    images: model-ready float32 [N, ...]; labels int [N]; batches of `batch_size` in the
    given order (BN batch statistics depend on the batches).
    """

    def __init__(self, model, images, labels, batch_size: int, strategy=None,
                 knowledge_weight: float = 1.0, cache_prefix: bool = True,
                 forward: str = "sliced"):
        images = np.asarray(images, np.float32)
        labels = np.asarray(labels, np.int64)
        if len(images) == 0:
            raise UserError("the validation set is empty: nothing to search on "
                             "(check data.val_per_class and the training split)")
        if batch_size < 1:
            raise UserError(f"search.batch_size must be >= 1, got {batch_size}")
        if forward not in FORWARDS:
            raise UserError(f"search.forward must be one of {FORWARDS}, got {forward!r}")
        self.model = model
        self.dependency = model.dependency
        self.forward = forward
        self.strategy = strategy or tf.distribute.get_strategy()
        self.num_replicas = self.strategy.num_replicas_in_sync
        self.num_examples = len(images)
        self.labels = labels
        self.knowledge_weight = float(knowledge_weight)
        self.groups = list(model.gate_groups)
        self._bounds = [(i, min(i + batch_size, len(images)))
                        for i in range(0, len(images), batch_size)]
        self._x = tuple(self._distribute(images[a:b]) for a, b in self._bounds)
        self._y = tuple(self._distribute(labels[a:b].astype(np.int32)) for a, b in self._bounds)
        self.first_node = first_nodes(self.dependency)
        self.positions = sorted(set(self.first_node.values()) - {0}) if cache_prefix else []
        self._live = {p: self.dependency.graph.live_tensors(p) for p in self.positions}
        self.trace_counts = collections.Counter()
        self._record_tids = None
        self._cache = None    # {position: tuple over batches of tuples of live tensors}
        self._pending = None
        self._eval_fns = {}
        self._score_fn = tf.function(self._score_body, autograph=False, reduce_retracing=True)
        self._capture_fn = tf.function(self._capture_body, autograph=False,
                                       reduce_retracing=True)
        self._relaxed = set()  # functions traced once for all their calls (see `_trace`)

    # -- data placement
    def _split(self, n):
        r = self.num_replicas
        edges = [n * i // r for i in range(r + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def _distribute(self, array):
        parts = [array[a:b] for a, b in self._split(len(array))]
        if self.num_replicas == 1:
            return tf.constant(parts[0])
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group]))

    def _local(self, value):
        if self.num_replicas == 1:
            return [value]
        return list(self.strategy.experimental_local_results(value))

    def _run(self, fn, *args):
        if self.num_replicas == 1:
            return fn(*args)
        return self.strategy.run(fn, args=args)

    def _concat_logits(self, per_batch):
        if self.num_replicas > 1 and isinstance(self.strategy,
                                                tf.distribute.MultiWorkerMirroredStrategy):
            # Other workers' replicas are not local: all-gather them (in replica order, as
            # the batch was split; every worker runs this collective).
            return np.concatenate([self.strategy.gather(v, axis=0).numpy() for v in per_batch],
                                  0)
        return np.concatenate([np.concatenate([t.numpy() for t in self._local(v)], 0)
                               for v in per_batch], 0)

    @property
    def trace_count(self) -> int:
        return int(sum(self.trace_counts.values()))

    def _kept(self) -> tuple:
        """The kept indices (the sliced forward's argument; the masked one reads masks)."""
        if self.forward != "sliced":
            return ()
        return tuple(tf.constant(g.kept_indices().astype(np.int32)) for g in self.groups)

    def _trace(self, fn, args) -> None:
        """Traces `fn` once for all calls: at relaxed shapes for the sliced forward (widths
        change every step), at the fixed shapes of the masked one."""
        if id(fn) not in self._relaxed:
            fn.get_concrete_function(*(relaxed_spec(args) if self.forward == "sliced"
                                       else args))
            self._relaxed.add(id(fn))

    def _call(self, fn, *args):
        # Traced first: a call at fixed shapes would also pick other kernels than the
        # general trace (other rounding) and trace again when the widths change.
        self._trace(fn, args)
        return fn(*args)

    # -- traced bodies
    def _forward_pass(self, idx, x=None, start=0, feed=None, record=None, capture=False):
        """(logits, captures) of the current sub-network from node `start`."""
        bn = BatchNormStep("batch", sync=True)
        if start > 0:
            feed = dict(zip(self.dependency.graph.live_tensors(start), feed))
        capture_at = self.positions if capture else ()
        if self.forward == "sliced":
            kept = {g.name: i for g, i in zip(self.groups, idx)}
            outputs, captures = self.model.sliced.run(x, kept, bn, False, record=record,
                                                      start=start, feed=feed,
                                                      capture_at=capture_at)
        else:
            outputs, captures = self.model.masked.run(x, bn, False, record=record, start=start,
                                                      feed=feed, capture_at=capture_at)
        return outputs[0], [captures[p] for p in capture_at]

    def _score_body(self, xs, ys, ks, idx):
        self.trace_counts["score"] += 1
        out_sums, out_captures, out_logits = [], [], []
        for x, y, k in zip(xs, ys, ks):
            def replica(x, y, k, idx):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    record = []
                    logits, captures = self._forward_pass(idx, x, record=record, capture=True)
                    total = objective_sum_tf(logits, y, k, self.knowledge_weight)
                    total = total / float(self.num_examples)
                self._record_tids = [tid for tid, _ in record]
                outs = [v for _, v in record]
                grads = tape.gradient(total, outs)
                sums = [tf.reduce_sum((tf.zeros_like(o) if g is None else g) * o,
                                      axis=list(range(len(o.shape) - 1)))
                        for g, o in zip(grads, outs)]
                return sums, captures, logits
            sums, captures, logits = self._run(replica, x, y, k, idx)
            if self.num_replicas > 1:
                sums = [self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                        for v in sums]
            out_sums.append(sums)
            out_captures.append(captures)
            out_logits.append(logits)
        return out_sums, out_captures, out_logits

    def _capture_body(self, xs, idx):
        self.trace_counts["capture"] += 1
        out_captures, out_logits = [], []
        for x in xs:
            logits, captures = self._run(
                lambda x, idx: self._forward_pass(idx, x, capture=True), x, idx)
            out_captures.append(captures)
            out_logits.append(logits)
        return out_captures, out_logits

    def _eval_fn(self, start):
        if start not in self._eval_fns:
            def body(feeds, idx):
                self.trace_counts[f"eval_from_{start}"] += 1
                if start == 0:
                    return [self._run(lambda x, idx: self._forward_pass(idx, x)[0], x, idx)
                            for x in feeds]
                return [self._run(lambda f, idx: self._forward_pass(idx, start=start,
                                                                    feed=f)[0], f, idx)
                        for f in feeds]
            self._eval_fns[start] = tf.function(body, autograph=False, reduce_retracing=True)
        return self._eval_fns[start]

    # -- public API
    def _set_cache(self, captures):
        # captures[batch][position index] -> cache[position] = tuple over batches
        if not self.positions:
            self._cache = None
            return
        self._cache = {p: tuple(captures[b][i] for b in range(len(captures)))
                       for i, p in enumerate(self.positions)}

    def _knowledge(self, knowledge):
        knowledge = np.asarray(knowledge, np.float32)
        return tuple(self._distribute(knowledge[a:b]) for a, b in self._bounds)

    def score(self, knowledge) -> tuple[dict, np.ndarray]:
        """Taylor scores per group under the current masks, and the current logits.

        (The search re-ranks channels after scoring, which may change the masks: it then
        calls `refresh_if_changed` to get a valid prefix cache.)"""
        kept = {g.name: g.kept_indices() for g in self.groups}
        sums, captures, logits = self._call(self._score_fn, self._x, self._y,
                                            self._knowledge(knowledge), self._kept())
        scores = {g.name: np.zeros(g.channels, np.float64) for g in self.groups}
        for batch_sums in sums:
            for tid, v in zip(self._record_tids, batch_sums):
                self._add_scores(scores, self.dependency.gates[tid],
                                 v.numpy().astype(np.float64), kept)
        # the scoring forward is a valid prefix cache as long as re-ranking keeps the masks
        self._pending = (captures, self._mask_snapshot())
        return scores, self._concat_logits(logits)

    def _add_scores(self, scores, layout, v, kept):
        """Adds |v| of one gate use to the groups of its layout (real-width positions are
        scattered back to their channels; pruned channels score 0)."""
        if layout.tile > 1:
            v = v.reshape(layout.tile, -1).sum(0)
        offset = 0
        for name, size in layout.segments:
            sliced = self.forward == "sliced" and name is not None
            width = len(kept[name]) if sliced else size
            part = np.abs(v[offset:offset + width])
            offset += width
            if name is None:
                continue
            if sliced:
                scores[name][kept[name]] += part
            else:
                scores[name] += part

    def _mask_snapshot(self):
        return [g.mask() for g in self.groups]

    def refresh_if_changed(self) -> bool:
        """After `score` and re-ranking: reuses the scoring forward as the prefix cache when
        the masks did not change (the usual case), else runs `refresh`. True if reused."""
        pending, self._pending = self._pending, None
        if pending is not None and all(np.array_equal(a, b) for a, b in
                                       zip(pending[1], self._mask_snapshot())):
            self._set_cache(pending[0])
            return True
        self.refresh()
        return False

    def refresh(self) -> np.ndarray:
        """Forward of the current sub-network: refreshes the prefix cache, returns its logits."""
        captures, logits = self._call(self._capture_fn, self._x, self._kept())
        self._set_cache(captures)
        return self._concat_logits(logits)

    def evaluate(self, changed_group: str | None = None) -> np.ndarray:
        """Validation logits of the current masks.

        `changed_group`: the only group changed since the last `score`/`refresh`; the
        layers before the first one touching it are read from the cache."""
        start = 0
        if changed_group is not None and self._cache is not None:
            start = self.first_node[changed_group]
        feeds = self._x if start == 0 else self._cache[start]
        return self._concat_logits(self._call(self._eval_fn(start), feeds, self._kept()))

    def warm_up(self, knowledge) -> None:
        """Traces every function the search calls, for any widths (relaxed shapes), so
        that later calls never trace; fills the cache with one forward."""
        self._trace(self._score_fn, (self._x, self._y, self._knowledge(knowledge),
                                     self._kept()))
        self.refresh()
        starts = [0] + (list(self.positions) if self._cache else [])
        for start in starts:
            feeds = self._x if start == 0 else self._cache[start]
            self._trace(self._eval_fn(start), (feeds, self._kept()))


# --------------------------------------------------------------------------- plain evaluation
def subnets_logits_fn(model, kept_sets, sync_bn: bool = False, precision: str = "float32",
                      overlap: bool | None = None):
    """`fn(images)`: float32 logits `[B, classes, len(kept_sets)]` of a gated clone's
    sub-networks, each at its real width, given each one's kept indices (a tuple per
    sub-network, in `model.gate_groups` order, from `kept_indices_of`); BN with batch
    statistics (the fused kernel where it is fast). The memory bank's teachers.

    All sub-networks run in one graph: their ops are independent, so the executor
    overlaps them on its inter-op threads (9-14% faster than one call per teacher in
    bfloat16 on 2 cores; `benchmarks/memory_bank_speed.py`), and the kept indices are
    constants of the graph, so every width is static (the BN kernel chosen when traced).
    `overlap` (default: unless a GPU is visible) False runs them in turn (control edges):
    a GPU's one compute stream gains nothing from the overlap, and in turn only one
    sub-network's activations are alive at a time (ImageNet batches: the batch size is
    part of the result, so memory cannot be had by lowering it). `precision`
    (`train.precision`'s names): mixed_bfloat16 / mixed_float16 compute the layers
    in that dtype from the float32 weights, normalisation in float32."""
    names = [g.name for g in model.gate_groups]
    compute_dtype = keras.DTypePolicy(check_precision(precision)).compute_dtype
    kept_sets = [tuple(tf.constant(k, tf.int32) for k in kept) for kept in kept_sets]

    def one(x, kept):
        with compute_precision(model.base, precision):  # the Keras layers the graph calls
            outputs, _ = model.sliced.run(x, dict(zip(names, kept)),
                                          BatchNormStep("batch", sync=sync_bn, fused=True),
                                          False)
        return tf.cast(outputs[0], tf.float32)

    if overlap is None:
        overlap = not tf.config.list_logical_devices("GPU")

    def body(images):
        x = tf.cast(images, compute_dtype)
        logits = []
        for kept in kept_sets:
            with tf.control_dependencies([] if overlap else logits[-1:]):
                logits.append(one(x, kept))
        return tf.stack(logits, -1)

    # One trace for every batch size (the split's last batch is smaller): a trace of the
    # teachers costs about as much as 8 batches of 256 (ResNet-56, 5 teachers).
    return tf.function(body, input_signature=[images_spec(model)], autograph=False)


def images_spec(model) -> tf.TensorSpec:
    """float32 images of `model` (a GatedModel) at any batch size."""
    return any_batch_spec(model.base.inputs[0].shape)


def kept_indices_of(model, entry) -> tuple:
    """Kept channel indices of a history entry ({'rates', 'ranks'}), in group order."""
    from ekg_tf.graph.gates import kept_count
    out = []
    for g in model.gate_groups:
        rank = np.asarray(entry["ranks"][g.name])
        rate = min(max(float(entry["rates"][g.name]), 0.0), 1.0)
        kept = kept_count(g.channels, rate, g.round_to)  # the group's aligned width
        out.append(tf.constant(np.flatnonzero(rank < kept).astype(np.int32)))
    return tuple(out)


_FORWARDS = {}


def _forward_fn(model, training: bool):
    """One compiled forward per (model, BN mode), reused across calls."""
    key = (id(model), bool(training))
    if key not in _FORWARDS or _FORWARDS[key][0] is not model:
        _FORWARDS[key] = (model, tf.function(
            lambda x: model(x, training=training, freeze_bn_stats=True),
            input_signature=[images_spec(model)], autograph=False))
    return _FORWARDS[key][1]


def batch_logits(model, images, batch_size: int, training: bool):
    """Logits of `images` (numpy, model-ready) in batches; with `training` BN uses batch
    statistics and keeps its moving statistics frozen."""
    fn = _forward_fn(model, training)
    out = [fn(tf.constant(images[i:i + batch_size], tf.float32)).numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out, 0)


def top1(logits, labels) -> float:
    return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))
