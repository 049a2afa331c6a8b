"""Aligned widths (`search.round_to`): one kept-count rule read by the gates, the complexity
counter, the search's steps and landing, the memory bank's teachers, the spec and slimming;
bad values are clear errors."""
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from ekg_tf.errors import UserError
from ekg_tf.flops import ComplexityCounter, layer_macs
from ekg_tf.graph.gated import GatedModel
from ekg_tf.graph.gates import aligned_rate, aligned_widths, kept_count
from ekg_tf.models import build_model
from ekg_tf.slimming import slim_model
from ekg_tf.subnet import SubnetSpec
from ekg_tf.subnet_search import scoring
from ekg_tf.subnet_search.evaluator import kept_indices_of
from ekg_tf.subnet_search.search import EKGSearch, SearchSettings
from random_subnets import random_subnet


def test_kept_count_aligned_and_reference():
    # round_to = 1 is the reference's float32 count, unchanged
    assert [kept_count(16, r) for r in (1.0, 0.8, 1 - 3 / 16, 0.0)] == [16, 13, 13, 1]
    # aligned: C * rate rounded up to a multiple of r, at least r, at most C
    assert [kept_count(64, r, 8) for r in (1.0, 0.8, 0.75, 0.126, 0.0)] == [64, 56, 48, 16, 8]
    assert [kept_count(40, r, 16) for r in (1.0, 0.81, 0.6, 0.2)] == [40, 40, 32, 16]
    # a rate written as w/C (rounded to 5 decimals as the search writes it) lands on w
    for c, r in ((48, 16), (24, 8), (1280, 8), (96, 16)):
        for w in aligned_widths(c, r):
            assert kept_count(c, round(w / c, 5), r) == w
    assert aligned_widths(40, 16) == [16, 32, 40]


@pytest.fixture(scope="module")
def resnet20():
    return GatedModel(build_model("resnet20", 10))


@pytest.mark.parametrize("round_to", [8, 16])
def test_steps_landing_and_counter_see_aligned_widths(resnet20, round_to):
    """Coarse steps and the landing step move in whole units, every width they reach is
    a multiple of round_to (or the full width), and the counter counts those widths."""
    model = resnet20
    model.set_round_to(round_to)
    try:
        counter = ComplexityCounter(model)
        rates = {g.name: 1.0 for g in model.gate_groups}
        for g in model.gate_groups:  # walk every group down to its minimum
            step = scoring.step_size(g.channels, g.uses, 0.2, round_to)
            assert step * g.channels / round_to == pytest.approx(round(step * g.channels
                                                                       / round_to))
            for _ in range(20):
                low = scoring.clamp_rate(scoring.next_rate(rates[g.name], step))
                rates[g.name] = aligned_rate(g.channels, low, round_to)
                kept = kept_count(g.channels, rates[g.name], round_to)
                assert kept % round_to == 0 or kept == g.channels
        assert all(k == round_to for k in counter.kept_vector(rates))
        # landing: a candidate that would overshoot lands on the widest aligned width at
        # or below the target; one unit wider is above it
        rates = {g.name: 1.0 for g in model.gate_groups}
        for name in ("block1_0_conv1", "block1_1_conv1", "block1_2_conv1"):
            rates[name] = 0.5
        name = "block2_0_conv1"
        g = model.gate_group(name)
        step = scoring.step_size(g.channels, g.uses, 0.4, round_to)  # 2 or 3 units
        fine = scoring.fine_step(g.channels, round_to)
        assert fine == round_to / g.channels and step >= 2 * fine
        low = scoring.next_rate(1.0, step)
        full = counter.macs_ratio(rates)
        target = (full + counter.macs_ratio(dict(rates, **{name: low}))) / 2
        rate = scoring.candidate_rate(counter.macs_ratio, rates, name, step, fine, 0.4, target)
        kept = kept_count(g.channels, rate, round_to)
        assert kept % round_to == 0 and kept_count(g.channels, low, round_to) < kept < 64
        assert counter.macs_ratio(dict(rates, **{name: rate})) <= target
        wider = (kept + round_to) / g.channels
        assert counter.macs_ratio(dict(rates, **{name: wider})) > target
        # the removal sum covers exactly the channels the step removes
        score = np.arange(g.channels, dtype=np.float64)
        removed = g.channels - kept_count(g.channels, low, round_to)
        assert scoring.removal_sum(score, 1.0, step, round_to) == score[:removed].sum()
        assert scoring.removal_sum(score, round_to / g.channels, step, round_to) == \
            scoring.NOT_A_CANDIDATE  # at its minimum width
    finally:
        model.set_round_to(1)


def test_spec_memory_bank_and_slimming_share_the_widths(resnet20, tmp_path):
    model = resnet20
    rng = np.random.default_rng(3)
    model.set_round_to(8)
    try:
        spec = random_subnet(model, rng, min_rate=0.05)
        spec.to_json(str(tmp_path / "subnet.json"))
        with open(tmp_path / "subnet.json") as f:
            stored = json.load(f)["groups"]
        back = SubnetSpec.from_json(str(tmp_path / "subnet.json"))
        assert back == spec and back.round_to == {g.name: 8 for g in model.gate_groups}
        old = {"arch": "resnet20", "num_classes": 10, "input_shape": [32, 32, 3], "groups": {
            n: {k: v for k, v in g.items() if k != "round_to"} for n, g in stored.items()}}
        assert set(SubnetSpec.from_dict(old).round_to.values()) == {1}  # specs before round_to
        entry = {"rates": spec.rates, "ranks": {n: list(g.rank) for n, g in spec.groups.items()}}
        teacher = kept_indices_of(model, entry)
        for g, idx in zip(model.gate_groups, teacher):
            kept = g.kept
            assert kept % 8 == 0 or kept == g.channels
            assert len(g.kept_indices()) == len(idx) == kept == spec.groups[g.name].kept
            assert stored[g.name]["kept"] == kept == len(stored[g.name]["kept_indices"])
        slim = slim_model(model, spec)
        for layer in slim.layers:
            if hasattr(layer, "filters") and layer.name != "conv":
                assert layer.filters % 8 == 0, layer.name
        counter = ComplexityCounter(model.dependency, round_to=spec.round_to)
        assert counter.count(spec.rates).macs == layer_macs(slim)
        # a fresh gated clone takes round_to from the spec
        other = GatedModel(build_model("resnet20", 10))
        spec.apply_to(other)
        assert [g.kept for g in other.gate_groups] == [g.kept for g in model.gate_groups]
    finally:
        model.set_round_to(1)


def _small_cnn():
    """Three prunable groups of 16-32 channels at 16x16 (a fast real search)."""
    import keras
    L = keras.layers
    x = keras.Input((16, 16, 3))
    s = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", name="c0")(x)))
    y = L.ReLU()(L.BatchNormalization()(L.Conv2D(32, 3, padding="same", name="c1")(s)))
    y = L.BatchNormalization()(L.Conv2D(16, 3, padding="same", name="c2")(y))
    y = L.ReLU()(L.Add()([s, y]))
    y = L.ReLU()(L.BatchNormalization()(L.Conv2D(32, 3, strides=2, padding="same",
                                                 name="c3")(y)))
    y = L.GlobalAveragePooling2D()(y)
    return keras.Model(x, L.Dense(10)(y), name="small")


def test_a_real_aligned_search_keeps_aligned_widths(tmp_path):
    """Steps of the real search (Taylor scores, EKG objective, landing) at round_to=8:
    every width it keeps is aligned, rates are the kept fractions, the MACs fall."""
    from ekg_tf.subnet_search.search import search_subnetwork
    model = GatedModel(_small_cnn())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16, 16, 3)).astype(np.float32)
    y = np.arange(40) % 10
    settings = SearchSettings(target_ratio=0.55, max_steps=6, round_to=8)
    result, _ = search_subnetwork(model, x, y, settings, str(tmp_path / "search"),
                                  batch_size=40, fingerprint={"test": 1})
    ratios = [e["macs_ratio"] for e in result.history]
    assert result.steps >= 3 and all(a > b for a, b in zip(ratios, ratios[1:]))
    for entry in result.history:
        for g in model.gate_groups:
            kept = kept_count(g.channels, entry["rates"][g.name], 8)
            assert kept % 8 == 0 and kept == round(entry["rates"][g.name] * g.channels)
    assert all(g.round_to == 8 for g in model.gate_groups)
    assert set(result.spec.round_to.values()) == {8}
    if result.done:  # the landing step: just at or below the target
        assert ratios[-1] <= 0.55 < ratios[-2]
    # another round_to is another run: its state is refused, not resumed
    with pytest.raises(UserError, match="round_to: saved 8 vs now 16"):
        search_subnetwork(model, x, y, SearchSettings(target_ratio=0.55, max_steps=6,
                                                      round_to=16),
                          str(tmp_path / "search"), batch_size=40, fingerprint={"test": 1})


@pytest.mark.parametrize("bad", [0, -8, 2.5, "8", True, None])
def test_bad_round_to_is_a_clear_error(bad):
    with pytest.raises(UserError, match=r"search.round_to must be an integer >= 1"):
        SearchSettings(round_to=bad)


def test_round_to_larger_than_a_group_is_a_clear_error(resnet20):
    with pytest.raises(UserError, match=r"round_to=32 is larger than gate group 'conv' "
                                         r"\(16 channels.*at most 16"):
        resnet20.set_round_to(32)
    assert all(g.round_to == 1 for g in resnet20.gate_groups)  # nothing half-set
    with pytest.raises(UserError, match="larger than gate group"):
        EKGSearch(resnet20, evaluator=type("E", (), {"labels": None})(),
                  settings=SearchSettings(round_to=64), search_dir="unused", fingerprint={})


def test_ekg_search_reports_a_too_wide_round_to_before_any_work(tmp_path):
    """The search stage refuses a round_to wider than a group with a UserError (the CLIs
    print it as one `error:` line, tests/test_cli.py) before the adaptation pass and
    before anything is written."""
    import importlib.util
    from ekg_tf.subnet_search.pipeline import run_search
    spec = importlib.util.spec_from_file_location(
        "synthetic", os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.search.round_to = 32
    log = []
    with pytest.raises(UserError, match=r"search.round_to=32 is larger than gate group "
                                        r"'conv' \(16 channels"):
        run_search(config, str(tmp_path), log=log.append)
    assert not any("adaptation" in m for m in log)
    assert not os.path.exists(tmp_path / "search" / "weights.weights.h5")
