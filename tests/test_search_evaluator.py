"""The compiled evaluator equals the model's own forward; its scores equal the Gate probes;
the prefix cache changes nothing; no retracing after warm-up."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

from ekg_tf.models import build_model
from ekg_tf.search.evaluator import SubnetEvaluator, recalibrate_batch_norm
from ekg_tf.search.objective import objective_sum_tf
from ekg_tf.search.sliced import SlicedSubnetEvaluator


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    model = build_model("resnet20", 10)
    for bn, _ in model.batch_norms():   # non-trivial BN so every path matters
        bn.gamma.assign(rng.uniform(0.5, 1.5, bn.gamma.shape).astype(np.float32))
        bn.beta.assign(rng.normal(0, 0.1, bn.beta.shape).astype(np.float32))
    for g in model.gate_groups:
        g.set_rank_from_score(rng.random(g.channels))
        g.rate = 0.7
    x = rng.normal(size=(100, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 100)
    k = rng.normal(size=(100, 10)).astype(np.float32)
    ev = SubnetEvaluator(model, x, y, 64)
    return model, ev, x, y, k


def _model_logits(model, x, bs=64):
    return np.concatenate([model(x[i:i + bs], training=True, freeze_bn_stats=True).numpy()
                           for i in range(0, len(x), bs)])


def test_logits_and_scores_match_model_and_probes(setup):
    model, ev, x, y, k = setup
    ev.warm_up(k)
    traces = ev.trace_count
    scores, logits = ev.score(k)
    np.testing.assert_allclose(logits, _model_logits(model, x), atol=1e-5)
    probes = [g.score_probe for g in model.gates]
    ref = {g.name: np.zeros(g.channels) for g in model.gate_groups}
    for a, b in [(0, 64), (64, 100)]:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(probes)
            out = model(x[a:b], training=True, freeze_bn_stats=True)
            total = objective_sum_tf(out, y[a:b], k[a:b], 1.0) / 100.0
        for gate, grad in zip(model.gates, tape.gradient(total, probes)):
            ref[gate.group.name] += grad.numpy()
    for name in ref:
        # float32 sums over up to 64x32x32 terms in another order: 1% of the group's max
        np.testing.assert_allclose(scores[name], ref[name], rtol=0,
                                   atol=1e-2 * ref[name].max() + 1e-9)
        assert np.all(scores[name][model.gate_group(name).mask() == 0] == 0)
    assert sorted(np.argsort(-scores["stream2"])[:10]) == sorted(np.argsort(-ref["stream2"])[:10])
    # prefix cache: a candidate that changes one inner group equals the full forward
    ev.refresh()
    group = model.gate_group("block1_2/gate1")
    group.rate = 0.25
    cached = ev.evaluate(group.name)
    np.testing.assert_allclose(cached, _model_logits(model, x), atol=1e-5)
    group.rate = 0.7
    assert ev.trace_count == traces  # nothing traced after warm-up


def test_sliced_evaluator_equals_masked(setup):
    """The slim network (kept channels only) computes what the masked network computes."""
    model, ev, x, y, k = setup
    sliced = SlicedSubnetEvaluator(model, x, y, 64)
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
    for name in ("block0_1/gate1", "stream1", "stream2"):   # inner and stream groups
        group = model.gate_group(name)
        group.rate = 0.3
        np.testing.assert_allclose(sliced.evaluate(name), ev.evaluate(name), atol=1e-5)
        group.rate = 0.7
    assert sliced.trace_count == traces   # widths changed, nothing retraced


def test_bn_recalibration_population_moments(setup):
    model, _, x, _, _ = setup
    saved = [(bn.moving_mean.numpy(), bn.moving_variance.numpy()) for bn, _ in model.batch_norms()]
    for g in model.gate_groups:
        g.rate = 1.0
    recalibrate_batch_norm(model, x[:96], 32)
    # the stem BN sees the stem conv output: its population moments over all 96 images
    z = model.stem_conv(x[:96]).numpy().reshape(-1, 16)
    np.testing.assert_allclose(model.stem_bn.moving_mean.numpy(), z.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.stem_bn.moving_variance.numpy(), z.var(0), rtol=1e-3)
    for (bn, _), (m, v) in zip(model.batch_norms(), saved):
        bn.moving_mean.assign(m)
        bn.moving_variance.assign(v)
    for g in model.gate_groups:
        g.rate = 0.7


def test_empty_validation_set_is_refused():
    model = build_model("resnet20", 10)
    with pytest.raises(ValueError, match="validation set is empty"):
        SubnetEvaluator(model, np.zeros((0, 32, 32, 3), np.float32), np.zeros(0), 64)
