"""Unit tests of the search's pure parts: gate gradient, trimmed Otsu, steps, fine step,
knowledge update, teacher selection, bad inputs."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

from ekg_tf.flops import ComplexityCounter, complexity_graph
from ekg_tf.models import build_model
from ekg_tf.models.gates import Gate, GateGroup
from ekg_tf.search import scoring
from ekg_tf.search.memory_bank import select_teachers
from ekg_tf.search.objective import evaluate_logits, update_knowledge
from ekg_tf.search.otsu import trimmed_otsu
from ekg_tf.search.search import SearchSettings
from ekg_tf.search.state import SearchState, load_state, save_state


# ----------------------------------------------------------------------------- gate gradient
def test_gate_gradient_matches_hand_and_finite_difference():
    rng = np.random.default_rng(0)
    group = GateGroup("g", 4)
    group.rank = [2, 0, 3, 1]
    group.rate = 0.5                      # keeps channels with rank < 2: channels 1 and 3
    gate = Gate(group)
    x = tf.constant(rng.normal(size=(2, 3, 3, 4)).astype(np.float32))
    w = tf.constant(rng.normal(size=(2, 3, 3, 4)).astype(np.float32))
    mask = np.array([0, 1, 0, 1], np.float32)

    def loss_of(xx):
        return tf.reduce_sum(tf.tanh(gate(xx)) * w)

    with tf.GradientTape() as tape:
        tape.watch([x, gate.score_probe])
        loss = loss_of(x)
    dx, score = tape.gradient(loss, [x, gate.score_probe])
    y = x.numpy() * mask
    dy = (1 - np.tanh(y) ** 2) * w.numpy()
    # hand computation: |sum_{b,h,w} dL/dy * y| per channel; gradient passed through unmasked
    np.testing.assert_allclose(score.numpy(), np.abs((dy * y).sum((0, 1, 2))), rtol=1e-5)
    np.testing.assert_allclose(dx.numpy(), dy, rtol=1e-5)
    assert np.all(score.numpy()[[0, 2]] == 0)
    # finite difference: the score is |d/de L(channel c scaled by 1+e)| at e = 0
    eps = 1e-3
    for c in (1, 3):
        scale = np.ones(4, np.float32)
        scale[c] = 1 + eps
        up = float(loss_of(x * scale))
        scale[c] = 1 - eps
        down = float(loss_of(x * scale))
        np.testing.assert_allclose(abs(up - down) / (2 * eps), score.numpy()[c], rtol=2e-2)


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
    model = build_model("resnet20", 10)
    return model, ComplexityCounter(complexity_graph(model))


def test_fine_step_lands_at_target(counter20):
    model, counter = counter20
    rates = {g.name: 1.0 for g in model.gate_groups}
    for name in ("block0_0/gate1", "block0_1/gate1", "block0_2/gate1"):
        rates[name] = 0.2
    current = counter.macs_ratio(rates)
    name = "block1_1/gate1"
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
