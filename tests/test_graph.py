"""The channel-dependency graph on models that are not the built-in ResNets.

keras.applications ResNet50, MobileNetV2 and EfficientNetB0 (random weights, 32x32), a
MobileNetV2 backbone nested in a user model with a new head, and a hand-made model with
a Concatenate, an SE block on the concatenation, depthwise/separable convs, a
LayerNormalization and a Flatten before the Dense. For each: the groups and pins, the
gated clone at rate 1.0 == the original, slimmed == gated and masked == real width at
random rates, and the analytic MACs/params == counts from the slimmed model's layers.

Tolerances (float32 logits, relative to max |logit| of the reference, at least 1):
gated at rate 1 vs original 1e-5 (the masked kernels are renormalised: l2_normalize *
norm); slimmed vs gated (BN moving statistics) 1e-4; real width vs masked with BN batch
statistics 5e-4 (batches of 8 images: dividing by small batch variances amplifies the
different summation order of full-width and sliced convolutions).
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from ekg_tf.flops import ComplexityCounter, layer_macs
from ekg_tf.graph import UnsupportedModelError, dependency_graph
from ekg_tf.graph.gated import GatedModel, NothingToPruneError
from ekg_tf.graph.rules import BatchNormStep
from ekg_tf.models.sources import ModelSourceError, application, load_keras_file
from ekg_tf.slimming import slim_model
from random_subnets import random_subnet, randomize_batch_norm

SIZE = 32


def close(a, b, rel, what):
    a, b = np.asarray(a), np.asarray(b)
    tol = rel * max(1.0, float(np.abs(a).max()))
    diff = float(np.abs(a - b).max())
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:.3g}"


def handmade():
    """Concatenate, SE on the concatenation, depthwise + separable, LayerNorm, Flatten."""
    L = keras.layers
    inputs = keras.Input((SIZE, SIZE, 3), name="images")
    a = L.ReLU(name="a_relu")(L.BatchNormalization(name="a_bn")(
        L.Conv2D(16, 3, padding="same", name="a_conv")(inputs)))
    b = L.ReLU(name="b_relu")(L.BatchNormalization(name="b_bn")(L.Conv2D(8, 1, name="b_conv")(a)))
    c = L.Concatenate(name="concat")([a, b])
    s = L.GlobalAveragePooling2D(keepdims=True, name="se_pool")(c)
    s = L.Conv2D(6, 1, activation="relu", name="se_reduce")(s)
    s = L.Conv2D(24, 1, activation="sigmoid", name="se_expand")(s)
    c = L.Multiply(name="se_scale")([c, s])
    d = L.BatchNormalization(name="dw_bn")(L.DepthwiseConv2D(3, padding="same", name="dw")(c))
    e = L.LayerNormalization(name="ln")(L.SeparableConv2D(12, 3, padding="same", name="sep")(d))
    f = L.Dropout(0.2, name="drop")(L.Flatten(name="flat")(L.MaxPooling2D(4, name="pool")(e)))
    return keras.Model(inputs, L.Dense(10, name="logits")(f), name="handmade")


def nested():
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, alpha=0.35,
                                              input_shape=(SIZE, SIZE, 3))
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone(inputs))
    return keras.Model(inputs, keras.layers.Dense(10, name="head")(x), name="user_model")


MODELS = {
    "resnet50": lambda: keras.applications.ResNet50(
        weights=None, input_shape=(SIZE, SIZE, 3), classes=10, classifier_activation=None),
    "mobilenetv2": lambda: keras.applications.MobileNetV2(
        weights=None, input_shape=(SIZE, SIZE, 3), classes=10, classifier_activation=None,
        alpha=0.35),
    "efficientnetb0": lambda: keras.applications.EfficientNetB0(
        weights=None, input_shape=(SIZE, SIZE, 3), classes=10, classifier_activation=None),
    "nested": nested,
    "handmade": handmade,
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    # Seeded: the layers' initial weights otherwise follow Keras' global random state, which
    # depends on what ran before in the worker (one CI run drew a nested-model init whose
    # masked-vs-sliced BN difference crossed the tolerance).
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = MODELS[request.param]()
    randomize_batch_norm(model, rng)
    x = (rng.normal(size=(8, SIZE, SIZE, 3)) * 40 + 120).astype(np.float32)
    return request.param, model, GatedModel(model), x


def groups_by_producer(gated):
    return {m.layer: g for g in gated.gate_groups for m in g.members if m.role == "out"}


def test_groups_and_pins_are_listed(case):
    name, model, gated, _ = case
    dep = gated.dependency
    assert dep.groups and all(g.uses >= 1 and g.channels >= 1 for g in dep.groups)
    summary = dep.summary()
    assert all(g.name in summary for g in dep.groups) and "pinned:" in summary
    pins = {p.reason.split(":")[0] for p in dep.pinned}
    assert {"model input", "model output"} <= pins
    by_producer = groups_by_producer(gated)
    if name == "resnet50":  # one stream group per stage: projection + every block's last conv
        stream = by_producer["conv3_block1_0_conv"]
        assert {f"conv3_block{b}_3_conv" for b in range(1, 5)} <= set(by_producer) and all(
            by_producer[f"conv3_block{b}_3_conv"] is stream for b in range(1, 5))
        assert stream.uses == 4 and len(dep.groups) == 37
    if name == "mobilenetv2":  # an expanded group runs through its depthwise conv
        expand = by_producer["block_3_expand"]
        roles = {(m.layer, m.role) for m in expand.members}
        assert {("block_3_depthwise", "channel"), ("block_3_project", "in")} <= roles
        assert by_producer["block_4_project"] is by_producer["block_5_project"]  # residual
    if name == "efficientnetb0":  # SE: its expand conv is tied to the block's channels
        assert by_producer["block2a_se_expand"] is by_producer["block2a_expand_conv"]
        assert by_producer["block2a_se_reduce"].channels == 4
        assert any(p.layer == "normalization" and p.kind == "Normalization" for p in dep.pinned)
    if name == "nested":  # the backbone's layers are followed into the user's new head
        last = by_producer["mobilenetv2_0.35_32.Conv_1"]
        assert ("head", "in") in {(m.layer, m.role) for m in last.members}
    if name == "handmade":  # the SE gate of 24 channels splits over the 16 + 8 concatenated
        assert [m.layer for m in by_producer["a_conv"].members if m.role == "out"] == [
            "a_conv", "se_expand"]
        assert by_producer["b_conv"].channels == 8 and "se_expand" in {
            m.layer for m in by_producer["b_conv"].members if m.role == "out"}
        assert by_producer["se_reduce"].channels == 6
        assert by_producer["sep"].gate_tensors == ("pool:0",)  # gated before the Flatten


def test_gated_clone_at_rate_one_is_the_original(case):
    _, model, gated, x = case
    assert [v.path for v in gated.weights] == [v.path for v in model.weights]  # same weights
    close(model(x, training=False), gated(x), 1e-5, "gated (rate 1) vs original")


def test_random_subnetworks_slim_and_count_exactly(case):
    name, model, gated, x = case
    counter = ComplexityCounter(gated)
    assert counter.full.params_with_bn_stats == model.count_params()
    assert counter.full.macs == layer_macs(model)
    spec = random_subnet(gated, np.random.default_rng(1), min_rate=0.05)
    try:
        slim = slim_model(gated, spec)
        assert {type(l).__module__.split(".")[0] for l in slim.layers} == {"keras"}
        close(gated(x), slim(x, training=False), 1e-4, f"{name}: gated vs slimmed")
        count = counter.count(spec.rates)
        assert count.macs == layer_macs(slim) < counter.full.macs
        assert count.params_with_bn_stats == slim.count_params()
        masked = gated(x, training=True, freeze_bn_stats=True)
        kept = {g.name: tf.constant(g.kept_indices().astype(np.int32))
                for g in gated.gate_groups}
        sliced, _ = gated.sliced.run(x, kept, BatchNormStep("batch"))
        close(masked, sliced[0], 5e-4, f"{name}: masked vs real width (BN batch statistics)")
    finally:
        for g in gated.gate_groups:
            g.rate = 1.0


def test_aligned_widths_and_latency_blocks_of_any_model(case):
    """Aligned widths hold for every group of any traced model (slimmed layers, counter),
    and the latency model's blocks tile the graph and build at their grid widths."""
    from ekg_tf.latency.model import segment_grids
    from ekg_tf.latency.segments import segment_graph, segment_model
    name, model, gated, x = case
    round_to = max(r for r in (1, 2, 4, 8) if r <= min(g.channels for g in gated.gate_groups))
    rng = np.random.default_rng(2)
    gated.set_round_to(round_to)
    try:
        spec = random_subnet(gated, rng, min_rate=0.0)
        for g in gated.gate_groups:
            assert g.kept % round_to == 0 or g.kept == g.channels, g.name
        slim = slim_model(gated, spec)
        assert ComplexityCounter(gated).count(spec.rates).macs == layer_macs(slim)
        segments = segment_graph(gated.dependency)
        assert segments[0].start == 0 and segments[-1].stop == len(gated.dependency.graph.nodes)
        assert all(a.stop == b.start for a, b in zip(segments, segments[1:]))
        seg = max(segments, key=lambda s: len(s.groups))
        grids = segment_grids([gated.gate_group(n).channels for n in seg.groups],
                              [round_to] * len(seg.groups), max_cells=64)
        kept = {n: grid[len(grid) // 2] for n, grid in zip(seg.groups, grids)}
        block = segment_model(gated.dependency, seg, kept)
        shape = (2, *block.inputs[0].shape[1:])
        assert np.all(np.isfinite(block(np.ones(shape, np.float32)).numpy()))
    finally:
        gated.set_round_to(1)
        for g in gated.gate_groups:
            g.rate = 1.0


def test_layers_followed_only_in_part_pin_their_channels_with_the_reason():
    """BN over another axis, a grouped conv and a softmax over channels are known layers
    whose channels cannot be followed: pinned, listed, and the model still runs as is."""
    L = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = L.BatchNormalization(axis=1, name="bn_rows")(L.Conv2D(8, 3, name="c1")(inputs))
    x = L.ReLU()(L.Conv2D(8, 3, groups=2, name="grouped")(x))
    x = L.ReLU()(L.Conv2D(6, 1, name="free")(x))
    x = L.Softmax(name="channel_softmax")(L.Conv2D(4, 1, name="c4")(x))
    model = keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    gated = GatedModel(model)
    reasons = {p.layer: p.reason for p in gated.dependency.pinned}
    assert "other than the channels" in reasons["bn_rows"]
    assert "grouped convolution" in reasons["grouped"]
    assert "across channels" in reasons["channel_softmax"]
    assert [g.name for g in gated.gate_groups] == ["free"]  # the one group left prunable
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    close(model(x), gated(x), 1e-5, "gated vs original")
    gated.gate_group("free").rate = 0.5
    close(gated(x), slim_model(gated)(x), 1e-4, "slimmed vs gated")


# ----------------------------------------------------------------------------- bad inputs
def test_subclassed_model_says_what_is_supported():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3)

        def call(self, x):
            return self.conv(x)

    net = Net()
    net(tf.zeros([1, 8, 8, 3]))
    with pytest.raises(UnsupportedModelError, match="subclassed model.*functional and "
                                                    "Sequential"):
        dependency_graph(net)


def test_a_model_with_every_group_pinned_is_refused():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.Lambda(lambda t: t * 2.0, name="opaque")(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    dep = dependency_graph(model)
    assert any(p.layer == "opaque" and "Lambda" in p.reason for p in dep.pinned)
    with pytest.raises(NothingToPruneError, match="every channel group is pinned.*opaque"):
        GatedModel(model)


def test_keras_file_needing_custom_objects_is_refused(tmp_path):
    @keras.saving.register_keras_serializable(package="ekg_test")
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return x * 2.0

    inputs = keras.Input((4,))
    path = str(tmp_path / "custom.keras")
    keras.Model(inputs, Doubler()(keras.layers.Dense(3)(inputs))).save(path)
    keras.saving.get_custom_objects().pop("ekg_test>Doubler")
    with pytest.raises(ModelSourceError, match="needs custom objects.*safe_mode"):
        load_keras_file(path)


def test_unknown_application_name():
    with pytest.raises(ModelSourceError, match="no model 'MobileNetV9'.*MobileNetV2"):
        application("keras.applications.MobileNetV9", (32, 32, 3), 10)
