"""The analytic complexity counter against published numbers and a brute-force count."""
import numpy as np
import pytest
import tensorflow as tf

from ekg_tf.flops import ComplexityCounter, complexity_graph, count_complexity
from ekg_tf.models import build_model
from ekg_tf.models.layers import _masked_kernel


def test_resnet56_numbers():
    c = count_complexity(build_model("resnet56", 10))
    assert 850_000 <= c.params <= 860_000  # 0.85-0.86 M
    assert abs(c.macs - 125e6) / 125e6 < 0.01  # ~125 M multiply-adds
    assert c.params_with_bn_stats == build_model("resnet56", 10).count_params()


def test_resnet50_numbers():
    model = build_model("resnet50", 1000, input_shape=(224, 224, 3))
    c = count_complexity(model)
    assert abs(c.params - 25.5e6) / 25.5e6 < 0.01  # ~25.5 M
    assert abs(c.macs - 4.1e9) / 4.1e9 < 0.01  # ~4.1 G


def _brute_force(model, x):
    """Counts what the masked network really multiplies: non-zero masked kernel entries
    times the output positions observed in a forward pass, plus kept BN and FC weights."""
    outputs = {}
    originals = {}
    for conv in model.conv_layers():
        originals[conv] = conv.call

        def hooked(inputs, _conv=conv):
            y = originals[_conv](inputs)
            outputs[_conv.path] = y.shape
            return y
        conv.call = hooked
    try:
        model(x)
    finally:
        for conv, call in originals.items():
            conv.call = call
    params = macs = 0
    for conv in model.conv_layers():
        kernel = tf.ones_like(conv.kernel)
        nonzero = int(np.count_nonzero(_masked_kernel(kernel, conv.in_group, conv.out_group)))
        shape = outputs[conv.path]
        params += nonzero
        macs += nonzero * shape[1] * shape[2]
    for bn, conv in model.batch_norms():
        kept = conv.out_group.kept if conv.out_group is not None else bn.gamma.shape[0]
        params += 2 * kept
    fc = model.fc
    rows = int(np.count_nonzero(_masked_kernel(tf.ones_like(fc.kernel), fc.in_group, None)))
    params += rows + fc.bias.shape[0]
    macs += rows
    return params, macs


@pytest.mark.parametrize("arch,input_shape", [("resnet20", (32, 32, 3)),
                                              ("resnet50", (64, 64, 3))])
def test_random_subnetworks_match_brute_force(arch, input_shape):
    model = build_model(arch, 10, input_shape=input_shape)
    counter = ComplexityCounter(complexity_graph(model))
    rng = np.random.default_rng(0)
    x = tf.zeros([1, *input_shape])
    for _ in range(3):
        rates = {}
        for g in model.gate_groups:
            g.rank = rng.permutation(g.channels)
            g.rate = float(rng.uniform(0.0, 1.0))
            rates[g.name] = g.rate
        c = counter.count(rates)
        assert (c.params, c.macs) == _brute_force(model, x)


def test_counter_is_fast_and_pure():
    counter = ComplexityCounter(complexity_graph(build_model("resnet56", 10)))
    import time
    t = time.perf_counter()
    for i in range(2000):
        counter.count({"stream1": 0.5, "block0_0/gate1": i / 2000})
    assert time.perf_counter() - t < 2.0  # thousands of calls per second
    assert counter.count({}) == counter.full
    with pytest.raises(KeyError, match="unknown gate groups"):
        counter.count({"nope": 0.5})
