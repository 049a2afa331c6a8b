"""The analytic complexity counter against published numbers and counts taken from the
layers of the slimmed models themselves."""
import time

import keras
import numpy as np
import pytest

from ekg_tf.flops import ComplexityCounter, count_complexity, layer_macs
from ekg_tf.graph.gated import GatedModel
from ekg_tf.models import build_model
from ekg_tf.slimming import slim_model
from random_subnets import random_subnet


def test_resnet56_numbers():
    model = build_model("resnet56", 10)
    c = count_complexity(model)
    assert c.params == 855_770  # 0.85-0.86 M trainable
    assert abs(c.macs - 125e6) / 125e6 < 0.01  # ~125 M multiply-adds
    assert c.params_with_bn_stats == model.count_params() == 860_026


def test_resnet50_numbers():
    model = build_model("resnet50", 1000, input_shape=(224, 224, 3))
    c = count_complexity(model)
    assert abs(c.params - 25.5e6) / 25.5e6 < 0.01  # ~25.5 M
    assert abs(c.macs - 4.1e9) / 4.1e9 < 0.01  # ~4.1 G


def bn_statistics_count(model) -> int:
    return sum(2 * int(layer.moving_mean.shape[0]) for layer in model.layers
               if isinstance(layer, keras.layers.BatchNormalization))


@pytest.mark.parametrize("arch,input_shape", [("resnet20", (32, 32, 3)),
                                              ("resnet50", (64, 64, 3))])
def test_random_subnetworks_match_the_slimmed_layers(arch, input_shape):
    """MACs and params at random rates == what the slimmed Keras model's layers hold."""
    gated = GatedModel(build_model(arch, 10, input_shape=input_shape))
    counter = ComplexityCounter(gated)
    rng = np.random.default_rng(0)
    for _ in range(2):
        spec = random_subnet(gated, rng, min_rate=0.0)
        c = counter.count(spec.rates)
        slim = slim_model(gated, spec)
        assert c.macs == layer_macs(slim)
        assert c.params_with_bn_stats == slim.count_params()
        assert c.params == slim.count_params() - bn_statistics_count(slim)


def test_counter_is_fast_and_pure():
    counter = ComplexityCounter(GatedModel(build_model("resnet56", 10)))
    t = time.perf_counter()
    for i in range(2000):
        counter.count({"block1_0_conv3": 0.5, "block0_0_conv1": i / 2000})
    assert time.perf_counter() - t < 2.0  # thousands of calls per second
    assert counter.count({}) == counter.full
    with pytest.raises(KeyError, match="unknown gate groups"):
        counter.count({"nope": 0.5})
