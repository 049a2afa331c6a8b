"""The search evaluator: its logits equal the gated model's forward, its Taylor scores equal
gradients taken through per-channel probes, the prefix cache changes nothing, the
real-width and masked forwards agree, and nothing retraces after warm-up."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

from ekg_tf.graph.forward import MaskedForward
from ekg_tf.graph.gated import GatedModel
from ekg_tf.graph.rules import BatchNormStep
from ekg_tf.models import build_model
from ekg_tf.subnet_search.evaluator import SubnetEvaluator
from ekg_tf.subnet_search.objective import objective_sum_tf
from ekg_tf.slimming import batch_norm_layers, recalibrate_batch_norm


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    model = GatedModel(build_model("resnet20", 10))
    for bn in batch_norm_layers(model):  # non-trivial BN so every path matters
        bn.gamma.assign(rng.uniform(0.5, 1.5, bn.gamma.shape).astype(np.float32))
        bn.beta.assign(rng.normal(0, 0.1, bn.beta.shape).astype(np.float32))
    for g in model.gate_groups:
        g.set_rank_from_score(rng.random(g.channels))
        g.rate = 0.7
    x = rng.normal(size=(100, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 100)
    k = rng.normal(size=(100, 10)).astype(np.float32)
    ev = SubnetEvaluator(model, x, y, 64, forward="masked")
    return model, ev, x, y, k


def _model_logits(model, x, bs=64):
    return np.concatenate([model(x[i:i + bs], training=True, freeze_bn_stats=True).numpy()
                           for i in range(0, len(x), bs)])


class _ProbedForward(MaskedForward):
    """The masked forward with a ones-probe multiplying every gate use: the gradient of the
    loss w.r.t. a probe is that use's signed Taylor sum (a path independent of the
    evaluator's gradient at recorded tensors)."""

    def __init__(self, model):
        super().__init__(model.dependency, {g.name: g for g in model.gate_groups})
        self.probes = {tid: tf.Variable(tf.ones([layout.width]))
                       for tid, layout in model.dependency.gates.items()}

    def _at_gate(self, tid, value, cache):
        return super()._at_gate(tid, value, cache) * self.probes[tid]


def _probe_scores(model, x, y, k):
    forward = _ProbedForward(model)
    scores = {g.name: np.zeros(g.channels) for g in model.gate_groups}
    for a, b in [(0, 64), (64, 100)]:
        with tf.GradientTape() as tape:
            out, _ = forward.run(x[a:b], BatchNormStep("batch"))
            total = objective_sum_tf(out[0], y[a:b], k[a:b], 1.0) / 100.0
        grads = tape.gradient(total, list(forward.probes.values()))
        for tid, grad in zip(forward.probes, grads):
            offset = 0
            for name, size in model.dependency.gates[tid].segments:
                if name is not None:
                    scores[name] += np.abs(grad.numpy()[offset:offset + size])
                offset += size
    return scores


def test_logits_and_scores_match_model_and_probes(setup):
    model, ev, x, y, k = setup
    ev.warm_up(k)
    traces = ev.trace_count
    scores, logits = ev.score(k)
    np.testing.assert_allclose(logits, _model_logits(model, x), atol=1e-5)
    ref = _probe_scores(model, x, y, k)
    stream = "block2_0_conv3"
    for name in ref:
        # float32 sums over up to 64x32x32 terms in another order: 1% of the group's max
        np.testing.assert_allclose(scores[name], ref[name], rtol=0,
                                   atol=1e-2 * ref[name].max() + 1e-9)
        assert np.all(scores[name][model.gate_group(name).mask() == 0] == 0)
    assert sorted(np.argsort(-scores[stream])[:10]) == sorted(np.argsort(-ref[stream])[:10])
    # prefix cache: a candidate that changes one inner group equals the full forward
    ev.refresh()
    group = model.gate_group("block1_2_conv1")
    group.rate = 0.25
    cached = ev.evaluate(group.name)
    np.testing.assert_allclose(cached, _model_logits(model, x), atol=1e-5)
    group.rate = 0.7
    assert ev.trace_count == traces  # nothing traced after warm-up


def test_sliced_evaluator_equals_masked(setup):
    """The real-width sub-network computes what the masked network computes."""
    model, ev, x, y, k = setup
    sliced = SubnetEvaluator(model, x, y, 64, forward="sliced")
    sliced.warm_up(k)
    traces = sliced.trace_count
    s_masked, l_masked = ev.score(k)
    s_sliced, l_sliced = sliced.score(k)
    np.testing.assert_allclose(l_sliced, l_masked, atol=1e-5)
    for name in s_masked:
        # near-cancelling Taylor sums: float32 noise reaches ~1% of the largest score
        np.testing.assert_allclose(s_sliced[name], s_masked[name], rtol=0,
                                   atol=2e-2 * s_masked[name].max() + 1e-9)
    ev.refresh()
    sliced.refresh()
    for name in ("block0_1_conv1", "block1_0_conv3", "block2_0_conv3"):  # inner and streams
        group = model.gate_group(name)
        group.rate = 0.3
        np.testing.assert_allclose(sliced.evaluate(name), ev.evaluate(name), atol=1e-5)
        group.rate = 0.7
    assert sliced.trace_count == traces   # widths changed, nothing retraced


def test_bn_recalibration_population_moments(setup):
    model, _, x, _, _ = setup
    layers = batch_norm_layers(model)
    saved = [(bn.moving_mean.numpy(), bn.moving_variance.numpy()) for bn in layers]
    for g in model.gate_groups:
        g.rate = 1.0
    try:
        recalibrate_batch_norm(model, x[:96], 32)
        # the stem BN sees the stem conv output: its population moments over all 96 images
        z = model.base.get_layer("conv")(x[:96]).numpy().reshape(-1, 16)
        stem = model.base.get_layer("bn")
        np.testing.assert_allclose(stem.moving_mean.numpy(), z.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stem.moving_variance.numpy(), z.var(0), rtol=1e-3)
    finally:
        for bn, (m, v) in zip(layers, saved):
            bn.moving_mean.assign(m)
            bn.moving_variance.assign(v)
        for g in model.gate_groups:
            g.rate = 0.7


def test_bad_evaluator_inputs():
    model = GatedModel(build_model("resnet20", 10))
    with pytest.raises(ValueError, match="validation set is empty"):
        SubnetEvaluator(model, np.zeros((0, 32, 32, 3), np.float32), np.zeros(0), 64)
    with pytest.raises(ValueError, match="search.forward must be one of"):
        SubnetEvaluator(model, np.zeros((4, 32, 32, 3), np.float32), np.zeros(4), 4,
                        forward="fast")
