"""Built-in ResNets: plain Keras models whose traced channel groups are the reference's."""
import numpy as np
import pytest
import tensorflow as tf

from ekg_tf.graph import dependency_graph
from ekg_tf.graph.gated import GatedModel
from ekg_tf.graph.gates import kept_count
from ekg_tf.models import build_model, get_arch


def producers(group):
    return {m.layer for m in group.members if m.role == "out"}


@pytest.fixture(scope="module")
def resnet20():
    return GatedModel(build_model("resnet20", 10))


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture 'resnet57'.*resnet56"):
        build_model("resnet57", 10)


def test_resnet56_is_a_plain_keras_model_with_the_reference_groups():
    model = build_model("resnet56", 10)
    assert type(model).__name__ == "Functional"
    assert model.count_params() == 860_026  # the reference's counter: 0.860 M (incl. BN stats)
    graph = dependency_graph(model)
    groups = {g.name: g for g in graph.groups}
    assert len(groups) == 3 + 27
    # One residual-stream group per stage: the stem (stage 0) or the projection shortcut
    # and the last conv of every block of the stage, gated after every block's add+ReLU.
    for s, first in enumerate(("conv", "block1_0_conv3", "block2_0_conv3")):
        stream = groups[first]
        assert producers(stream) == {first} | {f"block{s}_{b}_conv2" for b in range(9)}
        assert stream.uses == (10 if s == 0 else 9) and stream.channels == 16 * 2 ** s
    # One group per block-internal conv, gated once after its ReLU.
    for s in range(3):
        for b in range(9):
            inner = groups[f"block{s}_{b}_conv1"]
            assert producers(inner) == {f"block{s}_{b}_conv1"} and inner.uses == 1
            assert inner.gate_tensors == (f"block{s}_{b}_relu1:0",)
    assert [p.reason.split(":")[0] for p in graph.pinned] == ["model input", "model output"]
    # The reference's initialisation and BN settings.
    assert all(np.all(model.get_layer(f"block{s}_{b}_bn2").gamma.numpy() == 0)
               for s in range(3) for b in range(9))
    bn = model.get_layer("bn")
    assert bn.epsilon == 1e-5 and bn.momentum == 0.9


def test_resnet50_has_bottlenecks_and_a_stem_group():
    model = build_model("resnet50", 1000, input_shape=(64, 64, 3))
    groups = {g.name: g for g in dependency_graph(model).groups}
    assert producers(groups["conv"]) == {"conv"} and groups["conv"].uses == 1  # after max-pool
    assert groups["conv"].gate_tensors == ("max_pool:0",)
    assert {"block0_0_conv0", "block0_0_conv1"} <= set(groups)
    assert groups["block3_0_conv3"].channels == 2048 and groups["block3_0_conv3"].uses == 3
    assert len(groups) == 1 + 4 + 2 * 16
    assert model(tf.zeros([2, 64, 64, 3])).shape == (2, 1000)


def test_gate_group_rate_rank_and_mask(resnet20):
    g = resnet20.gate_group("block1_0_conv1")
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
    g.rank, g.rate = np.arange(32), 1.0


def test_kept_count_follows_float32_threshold():
    assert kept_count(16, 1.0) == 16
    assert kept_count(16, 0.8) == 13  # 12.8 -> ranks 0..12
    assert kept_count(16, 1 - 3 / 16) == 13
    assert kept_count(64, 0.0) == 1


def test_gating_changes_logits_and_rate_one_restores_them(resnet20):
    x = tf.random.stateless_normal([4, 32, 32, 3], seed=[1, 2])
    for s in range(3):
        for b in range(3):  # gamma=0 would hide inner changes
            bn = resnet20.base.get_layer(f"block{s}_{b}_bn2")
            bn.gamma.assign(tf.ones_like(bn.gamma))
    dense = resnet20(x).numpy()
    np.testing.assert_allclose(resnet20.base(x).numpy(), dense, atol=1e-5)
    g = resnet20.gate_group("block2_1_conv1")
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
        resnet20.gate_group("block1_0_conv3").rate = rate
        forward(x)
    assert len(traces) == 1


def test_arch_table():
    assert get_arch("ResNet110").blocks == (18, 18, 18)
    assert get_arch("resnet34").blocks == (3, 4, 6, 3) and not get_arch("resnet34").bottleneck
