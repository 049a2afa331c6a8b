"""Gated ResNets: structure, gate groups, and that gating is exact and reversible."""
import numpy as np
import pytest
import tensorflow as tf

from ekg_tf.models import build_model, get_arch, kept_count
from ekg_tf.models.layers import _masked_kernel


@pytest.fixture(scope="module")
def resnet20():
    return build_model("resnet20", 10)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture 'resnet57'.*resnet56"):
        build_model("resnet57", 10)


def test_resnet56_structure_matches_the_reference():
    model = build_model("resnet56", 10)
    assert model.count_params() == 860_026  # the reference's counter: 0.860 M (incl. BN stats)
    groups = model.gate_groups
    assert len(groups) == 3 + 27
    assert [g.uses for g in groups[:3]] == [10, 9, 9]  # stem + 9 blocks share stream0
    # projection shortcuts only where width/stride change; last BN of a block starts at gamma=0
    assert [b.projection is not None for b in model.blocks].count(True) == 2
    assert all(np.all(b.bns[-1].gamma.numpy() == 0) for b in model.blocks)
    assert model.stem_bn.epsilon == 1e-5 and model.stem_bn.momentum == 0.9


def test_resnet50_has_bottlenecks_and_a_stem_group():
    model = build_model("resnet50", 1000, input_shape=(64, 64, 3))
    names = [g.name for g in model.gate_groups]
    assert names[:5] == ["stem", "stream0", "stream1", "stream2", "stream3"]
    assert "block0_0/gate0" in names and "block0_0/gate1" in names
    assert model.gate_group("stream3").channels == 2048
    assert model(tf.zeros([2, 64, 64, 3])).shape == (2, 1000)


def test_gate_group_rate_rank_and_mask():
    model = build_model("resnet20", 10)
    g = model.gate_group("block1_0/gate1")
    assert g.channels == 32 and g.kept == 32
    g.set_rank_from_score(np.arange(32)[::-1].astype(float))  # channel 0 scores highest
    g.rate = 0.25
    assert g.kept == 8
    np.testing.assert_array_equal(g.kept_indices(), np.arange(8))
    np.testing.assert_array_equal(g.mask_variable.numpy(), g.mask())
    g.rate = 0.0  # at least one channel always survives
    assert g.kept == 1 and g.mask().sum() == 1
    with pytest.raises(ValueError, match="rate must be in"):
        g.rate = 1.5
    with pytest.raises(ValueError, match="permutation"):
        g.rank = np.zeros(32)


def test_kept_count_follows_float32_threshold():
    assert kept_count(16, 1.0) == 16
    assert kept_count(16, 0.8) == 13  # 12.8 -> ranks 0..12
    assert kept_count(16, 1 - 3 / 16) == 13
    assert kept_count(64, 0.0) == 1


def test_all_ones_mask_leaves_kernel_unchanged(resnet20):
    conv = resnet20.blocks[4].convs[0]
    masked = _masked_kernel(conv.kernel, conv.in_group, conv.out_group)
    np.testing.assert_allclose(masked.numpy(), conv.kernel.numpy(), rtol=1e-6, atol=1e-7)


def test_gating_changes_logits_and_rate_one_restores_them(resnet20):
    x = tf.random.stateless_normal([4, 32, 32, 3], seed=[1, 2])
    for b in resnet20.blocks:  # gamma=0 would hide inner changes
        b.bns[-1].gamma.assign(tf.ones_like(b.bns[-1].gamma))
    dense = resnet20(x).numpy()
    g = resnet20.gate_group("block2_1/gate1")
    g.rate = 0.5
    assert np.abs(resnet20(x).numpy() - dense).max() > 1e-4
    g.rate = 1.0
    np.testing.assert_allclose(resnet20(x).numpy(), dense, atol=1e-6)


def test_changing_rates_does_not_retrace(resnet20):
    traces = []

    @tf.function
    def forward(x):
        traces.append(1)
        return resnet20(x)

    x = tf.zeros([2, 32, 32, 3])
    forward(x)
    for rate in (0.5, 0.25, 1.0):
        resnet20.gate_group("stream1").rate = rate
        forward(x)
    assert len(traces) == 1


def test_arch_table():
    assert get_arch("ResNet110").blocks == (18, 18, 18)
    assert get_arch("resnet34").blocks == (3, 4, 6, 3) and not get_arch("resnet34").bottleneck
