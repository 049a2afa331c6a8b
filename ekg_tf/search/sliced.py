"""Sliced evaluation: the current sub-network run at its real width (single replica).

Under BN with batch statistics a pruned channel is exactly zero after its gate, so
the masked network equals the network whose convs, BNs and classifier keep only the
surviving channels (kernels rescaled to the unmasked Frobenius norm, as the mask
does). Running that slim network costs MACs in proportion to the sub-network
instead of the full network. Kept-channel indices are tensors of dynamic length and
every function has a fully dynamic input signature, so changing widths never
retraces. Scores are computed for the kept channels and scattered back (pruned
channels score 0, exactly as through the masked gates).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from ekg_tf.models.resnet import segment_forward
from ekg_tf.search.evaluator import SubnetEvaluator
from ekg_tf.search.objective import objective_sum_tf


def _conv(conv, x, idx):
    k = conv.kernel
    ks = k
    if conv.in_group is not None:
        ks = tf.gather(ks, idx[conv.in_group.name], axis=2)
    if conv.out_group is not None:
        ks = tf.gather(ks, idx[conv.out_group.name], axis=3)
    if conv.in_group is not None or conv.out_group is not None:
        ks = ks * (tf.norm(k) / tf.maximum(tf.norm(ks), 1e-6))
    return tf.nn.conv2d(x, ks, conv.strides, "SAME")


def _bn(bn, z, group, idx):
    mean, var = tf.nn.moments(z, [0, 1, 2])
    gamma, beta = bn.gamma, bn.beta
    if group is not None:
        gamma, beta = tf.gather(gamma, idx[group.name]), tf.gather(beta, idx[group.name])
    return tf.nn.batch_normalization(z, mean, var, beta, gamma, bn.epsilon)


def sliced_segment(model, s, x, idx, record=None):
    """Segment `s` at the kept widths `idx` (group name -> int32 kept channel indices).

    The model's dataflow with every conv/BN sliced to the kept channels; gates are
    not applied (the dropped channels are not there), their inputs are recorded.
    """
    def conv_bn(conv, bn, z):
        return _bn(bn, _conv(conv, z, idx), conv.out_group, idx)

    def gate(g, z):
        if record is not None:
            record.append((g.group.name, z))
        return z

    return segment_forward(model, s, x, conv_bn, gate)


def sliced_head(model, x, idx):
    fc = model.fc
    k = fc.kernel
    ks = k
    if fc.in_group is not None:
        ks = tf.gather(k, idx[fc.in_group.name], axis=0)
        ks = ks * (tf.norm(k) / tf.maximum(tf.norm(ks), 1e-6))
    return tf.matmul(tf.reduce_mean(x, axis=[1, 2]), ks) + fc.bias


class SlicedSubnetEvaluator(SubnetEvaluator):
    """`SubnetEvaluator` running the slim sub-network (one replica only)."""

    def __init__(self, model, images, labels, batch_size, strategy=None,
                 knowledge_weight: float = 1.0, cache_prefix: bool = True):
        super().__init__(model, images, labels, batch_size, strategy, knowledge_weight,
                         cache_prefix)
        if self.num_replicas != 1:
            raise ValueError("sliced evaluation runs on one replica; use search.sliced=False "
                             "with several replicas")
        self._names = [g.name for g in model.gate_groups]
        nb = len(self._bounds)
        img = tf.TensorSpec([None, None, None, None], tf.float32)
        idx_spec = tuple(tf.TensorSpec([None], tf.int32) for _ in self._names)
        batch = tuple(img for _ in range(nb))
        self._score_fn = tf.function(
            self._sliced_score_body, autograph=False,
            input_signature=[batch, tuple(tf.TensorSpec([None], tf.int32) for _ in range(nb)),
                             tuple(tf.TensorSpec([None, None], tf.float32)
                                   for _ in range(nb)), idx_spec])
        self._capture_fn = tf.function(self._sliced_capture_body, autograph=False,
                                       input_signature=[batch, idx_spec])
        self._batch_spec, self._idx_spec = batch, idx_spec

    def _idx(self):
        return tuple(tf.constant(g.kept_indices().astype(np.int32))
                     for g in self.model.gate_groups)

    def _as_dict(self, idx):
        return dict(zip(self._names, idx))

    def _sliced_forward(self, s, h, idx, record=None, inputs=None):
        for seg in range(s, self.n_segments):
            if inputs is not None:
                inputs.append(h)
            h = sliced_segment(self.model, seg, h, idx, record)
        return sliced_head(self.model, h, idx)

    def _sliced_score_body(self, xs, ys, ks, idx):
        self.trace_counts["score"] += 1
        idx = self._as_dict(idx)
        out_sums, out_inputs, out_logits = [], [], []
        for x, y, k in zip(xs, ys, ks):
            with tf.GradientTape() as tape:
                record, inputs = [], []
                tape.watch(x)
                logits = self._sliced_forward(0, x, idx, record, inputs)
                total = objective_sum_tf(logits, y, k, self.knowledge_weight)
                total = total / float(self.num_examples)
            self._record_names = [name for name, _ in record]
            outs = [t for _, t in record]
            grads = tape.gradient(total, outs)
            out_sums.append([tf.reduce_sum(g * o, axis=[0, 1, 2]) for g, o in zip(grads, outs)])
            out_inputs.append(inputs)
            out_logits.append(logits)
        return out_sums, out_inputs, out_logits

    def _sliced_capture_body(self, xs, idx):
        self.trace_counts["capture"] += 1
        idx = self._as_dict(idx)
        out_inputs, out_logits = [], []
        for x in xs:
            inputs = []
            out_logits.append(self._sliced_forward(0, x, idx, None, inputs))
            out_inputs.append(inputs)
        return out_inputs, out_logits

    def _eval_fn(self, s):
        if s not in self._eval_fns:
            def body(hs, idx):
                self.trace_counts[f"eval_from_{s}"] += 1
                idx = self._as_dict(idx)
                return [self._sliced_forward(s, h, idx) for h in hs]
            self._eval_fns[s] = tf.function(body, autograph=False,
                                            input_signature=[self._batch_spec, self._idx_spec])
        return self._eval_fns[s]

    # -- public API (same as SubnetEvaluator)
    def score(self, knowledge):
        knowledge = np.asarray(knowledge, np.float32)
        ks = tuple(tf.constant(knowledge[a:b]) for a, b in self._bounds)
        kept = [g.kept_indices() for g in self.model.gate_groups]
        sums, inputs, logits = self._score_fn(self._x, self._y, ks,
                                              tuple(tf.constant(k.astype(np.int32))
                                                    for k in kept))
        kept = dict(zip(self._names, kept))
        scores = {g.name: np.zeros(g.channels, np.float64) for g in self.model.gate_groups}
        for batch_sums in sums:
            for name, v in zip(self._record_names, batch_sums):
                scores[name][kept[name]] += np.abs(v.numpy().astype(np.float64))
        self._pending = (inputs, self._mask_snapshot())
        return scores, self._concat_logits(logits)

    def refresh(self):
        inputs, logits = self._capture_fn(self._x, self._idx())
        self._set_cache(inputs)
        return self._concat_logits(logits)

    def evaluate(self, changed_group=None):
        s = 0
        if changed_group is not None and self._cache is not None:
            s = self.first_segment[changed_group]
        hs = self._x if s == 0 else self._cache[s]
        return self._concat_logits(self._eval_fn(s)(hs, self._idx()))

    def warm_up(self, knowledge):
        self.refresh()
        # input signatures are fully dynamic: tracing once per function is enough
        self._score_fn.get_concrete_function()
        starts = sorted(set(self.first_segment.values()) | {0}) if self._cache else [0]
        for s in starts:
            self._eval_fn(s).get_concrete_function()


def sliced_logits_fn(model):
    """`fn(images, kept)`: logits of the slim sub-network given every group's kept indices
    (a tuple in `model.gate_groups` order), BN in training mode; one trace for all widths."""
    names = [g.name for g in model.gate_groups]
    n_segments = 1 + len(model.blocks)

    def body(x, kept):
        idx = dict(zip(names, kept))
        for s in range(n_segments):
            x = sliced_segment(model, s, x, idx)
        return sliced_head(model, x, idx)

    return tf.function(body, autograph=False, input_signature=[
        tf.TensorSpec([None, None, None, None], tf.float32),
        tuple(tf.TensorSpec([None], tf.int32) for _ in names)])


def kept_indices_of(model, entry) -> tuple:
    """Kept channel indices of a history entry ({'rates', 'ranks'}), in group order."""
    from ekg_tf.models.gates import kept_count
    out = []
    for g in model.gate_groups:
        rank = np.asarray(entry["ranks"][g.name])
        rate = min(max(float(entry["rates"][g.name]), 0.0), 1.0)
        out.append(tf.constant(np.flatnonzero(rank < kept_count(g.channels, rate))
                               .astype(np.int32)))
    return tuple(out)
