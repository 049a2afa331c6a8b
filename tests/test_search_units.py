"""Unit tests of the search's pure parts: gate gradient, trimmed Otsu, steps, fine step,
knowledge update, teacher selection, bad inputs."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

from ekg_tf.flops import ComplexityCounter
from ekg_tf.graph.gated import GatedModel
from ekg_tf.graph.gates import gate
from ekg_tf.models import build_model
from ekg_tf.subnet_search import scoring
from ekg_tf.subnet_search.memory_bank import select_teachers
from ekg_tf.subnet_search.objective import evaluate_logits, update_knowledge
from ekg_tf.subnet_search.otsu import trimmed_otsu
from ekg_tf.subnet_search.search import SearchSettings
from ekg_tf.subnet_search.state import SearchState, load_state, save_state


# ----------------------------------------------------------------------------- gate gradient
def test_gate_gradient_matches_hand_and_finite_difference():
    """The gate masks forward, passes the gradient through unmasked, and the Taylor score
    |sum_{b,h,w} dL/dy * y| taken at its output (as the search evaluator does) is the
    derivative of L along scaling that channel."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 3, 3, 4)).astype(np.float32))
    w = tf.constant(rng.normal(size=(2, 3, 3, 4)).astype(np.float32))
    mask = tf.constant([0, 1, 0, 1], tf.float32)  # rank [2, 0, 3, 1] at rate 0.5

    def loss_of(xx):
        return tf.reduce_sum(tf.tanh(gate(xx, mask)) * w)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = gate(x, mask)
        loss = tf.reduce_sum(tf.tanh(y) * w)
    dx, dy = tape.gradient(loss, [x, y])
    score = np.abs(tf.reduce_sum(dy * y, axis=[0, 1, 2]).numpy())
    y_np = x.numpy() * mask.numpy()
    dy_np = (1 - np.tanh(y_np) ** 2) * w.numpy()
    np.testing.assert_allclose(score, np.abs((dy_np * y_np).sum((0, 1, 2))), rtol=1e-5)
    np.testing.assert_allclose(dx.numpy(), dy_np, rtol=1e-5)  # not masked
    assert np.all(score[[0, 2]] == 0)
    eps = 1e-3
    for c in (1, 3):
        scale = np.ones(4, np.float32)
        scale[c] = 1 + eps
        up = float(loss_of(x * scale))
        scale[c] = 1 - eps
        down = float(loss_of(x * scale))
        np.testing.assert_allclose(abs(up - down) / (2 * eps), score[c], rtol=2e-2)


# ----------------------------------------------------------------------------- Otsu
def test_trimmed_otsu_two_clusters():
    # trim ceil(10*0.2)=2 each end -> [0,0,0,10,10,10]: split after the third value
    assert trimmed_otsu([0, 0, 0, 0, 0, 10, 10, 10, 10, 10]) == 5.0


def test_trimmed_otsu_hand_computed():
    values = [5, 1, 2, 3, 20, 21, 22, 100, -50, 4]
    # sorted: -50 1 2 3 4 5 20 21 22 100; trim 2 each end -> 2 3 4 5 20 21
    # best split t=4 ([2,3,4,5] | [20,21]) -> (5 + 20)/2
    assert trimmed_otsu(values) == 12.5


def test_trimmed_otsu_small_and_empty():
    assert trimmed_otsu([3.0]) == 3.0
    assert trimmed_otsu([1.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        trimmed_otsu([])


def test_mark_candidates_excludes_groups_at_minimum():
    sums = [0.1, 0.2, 5.0, 6.0, float("inf"), 0.15, 5.5, 0.12]
    marked = scoring.mark_candidates(sums)
    # finite sorted: .1 .12 .15 .2 5 5.5 6; trim 2 each end -> .15 .2 5; the only split
    # the reference tries (t=1) gives the threshold (.15 + .2)/2 = .175
    assert marked.tolist() == [True, False, False, False, False, True, False, True]


# ----------------------------------------------------------------------------- steps
def test_step_sizes():
    assert scoring.step_size(16, 1, 0.2) == 0.2
    assert scoring.step_size(64, 9, 0.2) == pytest.approx(0.2 / 9)
    assert scoring.step_size(16, 10, 0.2) == 1 / 16     # floor: one channel
    with pytest.raises(ValueError):
        scoring.step_size(0, 1, 0.2)


def test_removal_sum_takes_lowest_survivors():
    score = np.array([0.0, 0.0, 3.0, 1.0, 2.0, 5.0, 4.0, 6.0, 0.0, 7.0])  # 3 removed (zeros)
    # rate 0.7: removed = round(0.3*10)=3 zeros; next 0.2 -> sorted[3:5] = 1 + 2
    assert scoring.removal_sum(score, 0.7, 0.2) == 3.0
    assert scoring.removal_sum(score, 0.0, 0.2) == float("inf")


@pytest.fixture(scope="module")
def counter20():
    model = GatedModel(build_model("resnet20", 10))
    return model, ComplexityCounter(model)


def test_fine_step_lands_at_target(counter20):
    model, counter = counter20
    rates = {g.name: 1.0 for g in model.gate_groups}
    for name in ("block0_0_conv1", "block0_1_conv1", "block0_2_conv1"):
        rates[name] = 0.2
    current = counter.macs_ratio(rates)
    name = "block1_1_conv1"
    coarse = scoring.next_rate(rates[name], 0.2)
    target = (current + counter.macs_ratio(dict(rates, **{name: coarse}))) / 2
    rate = scoring.candidate_rate(counter.macs_ratio, rates, name, 0.2, 1 / 32, 0.2, target)
    assert coarse < rate < 1.0
    assert counter.macs_ratio(dict(rates, **{name: rate})) <= target
    # one fine step (1/C) wider is above the target: it lands "just at or below"
    assert counter.macs_ratio(dict(rates, **{name: rate + 1 / 32})) > target
    # a coarse step that stays above the target is used as is
    far = scoring.candidate_rate(counter.macs_ratio, rates, name, 0.2, 1 / 32, 0.2, 0.1)
    assert far == pytest.approx(0.8)


# ----------------------------------------------------------------------------- knowledge
def test_knowledge_running_mean():
    rng = np.random.default_rng(1)
    logits = [rng.normal(size=(6, 4)).astype(np.float32) for _ in range(5)]
    k, t = logits[0], 1
    for new in logits[1:]:
        k, t = update_knowledge(k, t, new)
    assert t == 5
    np.testing.assert_allclose(k, np.mean(logits, 0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        update_knowledge(k, t, np.zeros((6, 3)))


def test_objective_values():
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 0])
    knowledge = np.array([[0.0, 0.0], [0.0, 0.0]])
    m = evaluate_logits(logits, labels, knowledge)
    ce = [np.log1p(np.exp(-2.0)), np.log1p(np.exp(1.0))]
    assert m["loss"] == pytest.approx(np.mean(ce))
    lp = [[-ce[0], -2 - ce[0]], [-ce[1], 1 - ce[1]]]
    kce = -0.5 * np.sum(lp, 1)
    assert m["objective"] == pytest.approx(np.mean(ce) + np.mean(kce))
    assert m["accuracy"] == 0.5


# ----------------------------------------------------------------------------- teachers
def test_select_teachers_even_targets():
    losses = [0.9, 0.0, 0.5, 0.1, 0.7, 0.3, 0.2, 0.6, 0.8, 0.4]  # history order
    # sorted losses 0.0..0.9; targets 0, .18, .36, .54, .72 -> 0.0, 0.2, 0.4, 0.5, 0.7
    chosen = select_teachers(losses, 5)
    assert [losses[i] for i in chosen] == [0.0, 0.2, 0.4, 0.5, 0.7]
    assert chosen[0] == 1   # teacher 0 is the lowest loss


def test_select_teachers_no_repeats_and_short_history():
    chosen = select_teachers([0.5, 0.5, 0.5, 0.5], 3)
    assert len(set(chosen)) == 3
    assert sorted(select_teachers([0.3, 0.1], 5)) == [0, 1]


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("target", [0.0, 1.0, -0.2, 1.5])
def test_target_outside_unit_interval(target):
    with pytest.raises(ValueError, match="target_ratio must be in"):
        SearchSettings(target_ratio=target)


def test_bad_objective_and_importance():
    with pytest.raises(ValueError, match="objective"):
        SearchSettings(objective="nope")
    with pytest.raises(ValueError, match="importance"):
        SearchSettings(importance="nope")


def test_workdir_of_another_model_is_refused(tmp_path):
    state = SearchState({"arch": "resnet56", "num_classes": 10}, [{"step": 0}],
                        np.zeros((4, 10), np.float32), 1, {})
    save_state(str(tmp_path), state)
    with pytest.raises(ValueError, match="another run.*arch"):
        load_state(str(tmp_path), {"arch": "resnet20", "num_classes": 10})
    again = load_state(str(tmp_path), {"arch": "resnet56", "num_classes": 10})
    assert again.step == 0 and again.knowledge.shape == (4, 10)
