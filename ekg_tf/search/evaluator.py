"""Compiled evaluation of sub-networks on the validation set (the search's hot loop).

Speed (the reference re-runs the whole network per candidate, batch by batch):
- the network is cut into *segments* (the stem, then each residual block); a
  candidate changes one gate group, so everything before the group's first
  segment is the current sub-network's and is taken from a cache of segment
  inputs that the scoring pass of the step produces anyway;
- one `tf.function` per starting segment, each traced once (masks are
  variables, shapes never change): a candidate is one call for the whole
  validation set; `trace_counts` counts traces (a Python counter in the traced
  bodies) so benchmarks/tests can check there is no retracing after warm-up;
- `ekg_tf.search.sliced.SlicedSubnetEvaluator` (the CLI's default) runs the same
  at the sub-network's real width (dynamic-length kept indices, one trace).

Scoring: the Taylor score of a gate use is `|sum_{b,h,w} dL/dy * y|` with `y`
the gate's output (the Gate layer passes the gradient through unmasked). The
signed sums are all-reduced over replicas *before* the absolute value, so the
scores of N replicas equal those of one device (the Gate's own `score_probe`
takes the absolute value per replica, which would not).
BN runs in training mode with frozen moving statistics, as the reference.
"""
from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf

from ekg_tf.models.resnet import segment_forward
from ekg_tf.search.objective import objective_sum_tf


# --------------------------------------------------------------------------- forward pieces
def num_segments(model) -> int:
    return 1 + len(model.blocks)


def _bn(bn, z, training, moments):
    if moments is not None:
        moments.append(bn._batch_moments(z))
    return bn(z, training=training, freeze_stats=True)


def run_segment(model, s: int, x, training=True, record=None, moments=None):
    """Segment `s` of `model` (0: stem, s>0: block s-1), the model's own dataflow.

    `record` collects (group name, gate output) per gate use; `moments` collects the
    batch moments of every BN input (BN statistics re-estimation).
    """
    def conv_bn(conv, bn, z):
        return _bn(bn, conv(z), training, moments)

    def gate(g, z):
        y = g(z)
        if record is not None:
            record.append((g.group.name, y))
        return y

    return segment_forward(model, s, x, conv_bn, gate)


def run_head(model, x):
    return model.fc(tf.reduce_mean(x, axis=[1, 2]))


def segment_groups(model, s: int) -> set:
    """Names of the gate groups a segment reads or writes."""
    if s == 0:
        layers = [model.stem_conv]
        groups = {model.stem_group.name}
    else:
        block = model.blocks[s - 1]
        layers = list(block.convs) + ([block.projection] if block.projection is not None else [])
        groups = {g.group.name for g in block.gates} | {block.stream_gate.group.name}
    for conv in layers:
        for g in (conv.in_group, conv.out_group):
            if g is not None:
                groups.add(g.name)
    return groups


def first_segments(model) -> dict:
    """Group name -> first segment whose output it changes (where evaluation must start)."""
    first = {}
    for s in range(num_segments(model)):
        for name in segment_groups(model, s):
            first.setdefault(name, s)
    return first


# --------------------------------------------------------------------------- evaluator
class SubnetEvaluator:
    """Scores and evaluates sub-networks of `model` on a fixed validation set.

    images: normalised float32 [N,H,W,3]; labels int [N]; batches of
    `batch_size` in the given order (BN batch statistics depend on the batches).
    """

    def __init__(self, model, images, labels, batch_size: int, strategy=None,
                 knowledge_weight: float = 1.0, cache_prefix: bool = True):
        images = np.asarray(images, np.float32)
        labels = np.asarray(labels, np.int64)
        if len(images) == 0:
            raise ValueError("the validation set is empty: nothing to search on "
                             "(check data.val_per_class and the training split)")
        if batch_size < 1:
            raise ValueError(f"search.batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.strategy = strategy or tf.distribute.get_strategy()
        self.num_examples = len(images)
        self.labels = labels
        self.knowledge_weight = float(knowledge_weight)
        self.cache_prefix = cache_prefix
        self.num_replicas = self.strategy.num_replicas_in_sync
        self._bounds = [(i, min(i + batch_size, len(images)))
                        for i in range(0, len(images), batch_size)]
        self._x = tuple(self._distribute(images[a:b]) for a, b in self._bounds)
        self._y = tuple(self._distribute(labels[a:b].astype(np.int32)) for a, b in self._bounds)
        self.n_segments = num_segments(model)
        self.first_segment = first_segments(model)
        self.trace_counts = collections.Counter()
        self._record_names = None
        self._cache = None  # per segment: tuple over batches of per-replica inputs
        self._pending = None
        self._eval_fns = {}
        self._score_fn = tf.function(self._score_body, autograph=False)
        self._capture_fn = tf.function(self._capture_body, autograph=False)

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
        return np.concatenate([np.concatenate([t.numpy() for t in self._local(v)], 0)
                               for v in per_batch], 0)

    @property
    def trace_count(self) -> int:
        return int(sum(self.trace_counts.values()))

    # -- traced bodies
    def _forward_from(self, s, h, record=None, inputs=None):
        for seg in range(s, self.n_segments):
            if inputs is not None:
                inputs.append(h)
            h = run_segment(self.model, seg, h, training=True, record=record)
        return run_head(self.model, h)

    def _score_body(self, xs, ys, ks):
        self.trace_counts["score"] += 1
        out_sums, out_inputs, out_logits = [], [], []
        for x, y, k in zip(xs, ys, ks):
            def replica(x, y, k):
                with tf.GradientTape() as tape:
                    record, inputs = [], []
                    logits = self._forward_from(0, x, record, inputs)
                    total = objective_sum_tf(logits, y, k, self.knowledge_weight)
                    total = total / float(self.num_examples)
                self._record_names = [name for name, _ in record]
                outs = [t for _, t in record]
                grads = tape.gradient(total, outs)
                sums = [tf.reduce_sum(g * o, axis=list(range(len(o.shape) - 1)))
                        for g, o in zip(grads, outs)]
                return sums, inputs, logits
            sums, inputs, logits = self._run(replica, x, y, k)
            if self.num_replicas > 1:
                sums = [self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                        for v in sums]
            out_sums.append(sums)
            out_inputs.append(inputs)
            out_logits.append(logits)
        return out_sums, out_inputs, out_logits

    def _capture_body(self, xs):
        self.trace_counts["capture"] += 1
        out_inputs, out_logits = [], []
        for x in xs:
            def replica(x):
                inputs = []
                return inputs, self._forward_from(0, x, None, inputs)
            inputs, logits = self._run(replica, x)
            out_inputs.append(inputs)
            out_logits.append(logits)
        return out_inputs, out_logits

    def _eval_fn(self, s):
        if s not in self._eval_fns:
            def body(hs):
                self.trace_counts[f"eval_from_{s}"] += 1
                return [self._run(lambda h: self._forward_from(s, h), h) for h in hs]
            self._eval_fns[s] = tf.function(body, autograph=False)
        return self._eval_fns[s]

    # -- public API
    def _set_cache(self, out_inputs):
        # out_inputs[batch][segment] -> cache[segment] = tuple over batches
        if not self.cache_prefix:
            self._cache = None
            return
        self._cache = [tuple(out_inputs[b][s] for b in range(len(out_inputs)))
                       for s in range(self.n_segments)]

    def score(self, knowledge) -> tuple[dict, np.ndarray]:
        """Taylor scores per group under the current masks, and the current logits.

        (The search re-ranks channels after scoring, which may change the masks: it then
        calls `refresh_if_changed` to get a valid prefix cache.)"""
        knowledge = np.asarray(knowledge, np.float32)
        ks = tuple(self._distribute(knowledge[a:b]) for a, b in self._bounds)
        sums, inputs, logits = self._score_fn(self._x, self._y, ks)
        scores = {g.name: np.zeros(g.channels, np.float64) for g in self.model.gate_groups}
        for batch_sums in sums:
            for name, v in zip(self._record_names, batch_sums):
                scores[name] += np.abs(v.numpy().astype(np.float64))
        # the scoring forward is a valid prefix cache as long as re-ranking keeps the masks
        self._pending = (inputs, self._mask_snapshot())
        return scores, self._concat_logits(logits)

    def _mask_snapshot(self):
        return [g.mask() for g in self.model.gate_groups]

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
        inputs, logits = self._capture_fn(self._x)
        self._set_cache(inputs)
        return self._concat_logits(logits)

    def evaluate(self, changed_group: str | None = None) -> np.ndarray:
        """Validation logits of the current masks.

        `changed_group`: the only group changed since the last `score`/`refresh`; the
        segments before its first use are read from the cache."""
        s = 0
        if changed_group is not None and self._cache is not None:
            s = self.first_segment[changed_group]
        hs = self._x if s == 0 else self._cache[s]
        return self._concat_logits(self._eval_fn(s)(hs))

    def warm_up(self, knowledge) -> None:
        """Traces every function the search calls (without running them, except one
        forward to fill the cache), so that later calls never trace."""
        knowledge = np.asarray(knowledge, np.float32)
        ks = tuple(self._distribute(knowledge[a:b]) for a, b in self._bounds)
        self._score_fn.get_concrete_function(self._x, self._y, ks)
        self.refresh()
        starts = sorted(set(self.first_segment.values()) | {0}) if self._cache else [0]
        for s in starts:
            self._eval_fn(s).get_concrete_function(self._x if s == 0 else self._cache[s])


# --------------------------------------------------------------------------- plain evaluation
_FORWARDS = {}


def _forward_fn(model, training: bool):
    """One compiled forward per (model, BN mode), reused across calls."""
    key = (id(model), bool(training))
    if key not in _FORWARDS or _FORWARDS[key][0] is not model:
        _FORWARDS[key] = (model, tf.function(
            lambda x: model(x, training=training, freeze_bn_stats=True), autograph=False))
    return _FORWARDS[key][1]


def batch_logits(model, images, batch_size: int, training: bool):
    """Logits of `images` (numpy, normalised) in batches; BN in training mode keeps its
    moving statistics frozen."""
    fn = _forward_fn(model, training)
    out = [fn(tf.constant(images[i:i + batch_size])).numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out, 0)


def top1(logits, labels) -> float:
    return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


def recalibrate_batch_norm(model, images, batch_size: int) -> int:
    """Re-estimates every BN's moving mean/variance of the current sub-network from `images`
    (training images, never evaluation data): exact population moments over full batches.
    Returns the number of images used."""
    n_batches = len(images) // batch_size
    if n_batches < 1:
        raise ValueError(f"BN re-estimation needs at least one batch of {batch_size} images, "
                         f"got {len(images)}")
    bns = [bn for bn, _ in model.batch_norms()]

    @tf.function(autograph=False)
    def moments_fn(x):
        moments = []
        h = x
        for s in range(num_segments(model)):
            h = run_segment(model, s, h, training=True, moments=moments)
        return moments

    # run_segment visits BNs in its own order: map them by identity via a dry listing.
    order = _bn_visit_order(model)
    sum_mean = [0.0] * len(order)
    sum_sq = [0.0] * len(order)
    sum_var = [0.0] * len(order)
    for i in range(n_batches):
        x = tf.constant(images[i * batch_size:(i + 1) * batch_size])
        for j, (m, v) in enumerate(moments_fn(x)):
            m, v = m.numpy().astype(np.float64), v.numpy().astype(np.float64)
            sum_mean[j] = sum_mean[j] + m
            sum_sq[j] = sum_sq[j] + m * m
            sum_var[j] = sum_var[j] + v
    for j, bn in enumerate(order):
        mean = sum_mean[j] / n_batches
        var = sum_var[j] / n_batches + sum_sq[j] / n_batches - mean * mean
        bn.moving_mean.assign(mean.astype(np.float32))
        bn.moving_variance.assign(np.maximum(var, 0.0).astype(np.float32))
    assert set(map(id, order)) == set(map(id, bns))
    return n_batches * batch_size


def _bn_visit_order(model):
    order = [model.stem_bn]
    for block in model.blocks:
        if block.projection is not None:
            order.append(block.projection_bn)
        order += list(block.bns)
    return order


def bn_statistics(model):
    return [(bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy())
            for bn, _ in model.batch_norms()]


def restore_bn_statistics(model, stats):
    for (bn, _), (m, v) in zip(model.batch_norms(), stats):
        bn.moving_mean.assign(m)
        bn.moving_variance.assign(v)
