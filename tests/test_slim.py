"""Physical slimming (ekg_tf.slimming): gated logits == slim logits == BN-folded logits,
and BN re-estimation on training images (spec sections 2, 6, 9).

Tolerances (float32): logits agree within 1e-4 * max(1, max |logit|) absolute.
The ResNet-56 sub-network here is NOT a search result (the search writes
workdir/search/subnet.json, not available to these tests): it is the
deterministic stand-in of `export.subnets.l1_uniform_subnet` (L1-norm filter
ranks, one uniform rate lowered until ComplexityCounter.macs_ratio <= 0.45).
"""
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from ekg_tf.data import normalize  # noqa: E402
from ekg_tf.flops import ComplexityCounter  # noqa: E402
from ekg_tf.graph.gated import GatedModel  # noqa: E402
from ekg_tf.models import build_model  # noqa: E402
from ekg_tf.slimming import (fold_batch_norm, recalibrate_batch_norm,  # noqa: E402
                         slim_model)
from ekg_tf.subnet import SubnetSpec  # noqa: E402
from ekg_tf.export.subnets import l1_uniform_subnet  # noqa: E402
from random_subnets import random_subnet, randomize_batch_norm  # noqa: E402

ALLOWED = {"InputLayer", "Conv2D", "BatchNormalization", "ReLU", "Add", "MaxPooling2D",
           "GlobalAveragePooling2D", "Dense"}
RES56 = os.path.join(SHARED, "reference", "res56_cifar10.npz")
TRAIN = os.path.join(SHARED, "data", "cifar10", "cifar10_train.npz")
TEST1000 = os.path.join(SHARED, "data", "cifar10", "cifar10_test1000_lossless.npz")
needs_shared = pytest.mark.skipif(
    not all(os.path.exists(p) for p in (RES56, TRAIN, TEST1000)),
    reason=f"shared reference weights/data not found under {SHARED}")


def assert_logits_close(a, b, what, rel=1e-4):
    a, b = np.asarray(a), np.asarray(b)
    tol = rel * max(1.0, float(np.abs(a).max()))
    diff = float(np.abs(a - b).max())
    assert diff <= tol, f"{what}: max abs logit diff {diff:.3g} > {tol:.3g}"
    return diff


def gated(arch, **kwargs):
    return GatedModel(build_model(arch, 10, **kwargs))


def randomize(model, seed):
    """Random BN parameters/statistics and a random sub-network (ranks and rates)."""
    rng = np.random.default_rng(seed)
    randomize_batch_norm(model, rng)
    return random_subnet(model, rng, min_rate=0.05)


@pytest.fixture(scope="module")
def resnet20():
    model = gated("resnet20")
    spec = randomize(model, 0)
    x = np.random.default_rng(1).normal(size=(16, 32, 32, 3)).astype(np.float32)
    return model, spec, x


def test_resnet20_random_subnet_parity(resnet20, tmp_path):
    model, spec, x = resnet20
    slim = slim_model(model, spec)
    kinds = {type(layer).__name__ for layer in slim.layers}
    assert kinds <= ALLOWED, f"unexpected layer types {kinds - ALLOWED}"
    # Shapes follow the kept channels of the spec.
    kept = {n: g.kept for n, g in spec.groups.items()}
    assert slim.get_layer("conv").kernel.shape[-1] == kept["conv"]
    assert slim.get_layer("block0_0_conv1").kernel.shape[-1] == kept["block0_0_conv1"]
    assert slim.get_layer("block1_0_conv3").kernel.shape[-2:] == (kept["conv"],
                                                                  kept["block1_0_conv3"])
    assert slim.get_layer("fc").kernel.shape == (kept["block2_0_conv3"], 10)
    counter = ComplexityCounter(model)
    expected = counter.count(spec.rates)
    n_bn_stats = sum(2 * l.gamma.shape[0] for l in slim.layers
                     if isinstance(l, keras.layers.BatchNormalization))
    assert slim.count_params() == expected.params + n_bn_stats

    gated = model(x, training=False).numpy()
    out = slim(x, training=False).numpy()
    assert_logits_close(gated, out, "gated vs slim")
    folded = fold_batch_norm(slim)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    assert_logits_close(out, folded(x).numpy(), "slim vs BN-folded")

    # A plain .keras file: loads without custom objects and gives the same logits.
    path = str(tmp_path / "slim.keras")
    slim.save(path)
    loaded = keras.models.load_model(path, compile=False)
    np.testing.assert_array_equal(loaded(x).numpy(), out)


def test_spec_does_not_touch_gated_model(resnet20):
    model, spec, _ = resnet20
    before = SubnetSpec.from_model(model)
    other = SubnetSpec.from_dict({**spec.to_dict(), "groups": {
        n: {**g, "rate": 1.0} for n, g in spec.to_dict()["groups"].items()}})
    dense = slim_model(model, other)
    assert SubnetSpec.from_model(model) == before
    assert dense.get_layer("conv").kernel.shape[-1] == 16


def test_wrong_spec_is_refused(resnet20):
    model, _, _ = resnet20
    other = SubnetSpec.from_model(gated("resnet32"))
    with pytest.raises(ValueError, match="of resnet32.*does not fit resnet20"):
        slim_model(model, other)


def test_resnet50_bottleneck_parity():
    """The ImageNet stem (7x7/2 + max-pool), 'stem' group and bottleneck gates slim too."""
    model = gated("resnet50", input_shape=(64, 64, 3))
    spec = randomize(model, 3)
    x = np.random.default_rng(4).normal(size=(2, 64, 64, 3)).astype(np.float32)
    slim = slim_model(model, spec)
    assert {type(l).__name__ for l in slim.layers} <= ALLOWED
    out = slim(x).numpy()
    assert_logits_close(model(x).numpy(), out, "resnet50 gated vs slim")
    assert_logits_close(out, fold_batch_norm(slim)(x).numpy(), "resnet50 slim vs folded")


def test_recalibration_single_batch_equals_batch_statistics(resnet20):
    """One batch: the re-estimated statistics are that batch's, so inference == training mode."""
    model, spec, x = resnet20
    slim = slim_model(model, spec)
    recalibrate_batch_norm(slim, x, batch_size=len(x))
    assert_logits_close(slim(x, training=True).numpy(), slim(x, training=False).numpy(),
                        "slim: recalibrated inference vs batch statistics", rel=1e-4)
    other = gated("resnet20")
    randomize(other, 0)
    recalibrate_batch_norm(other, x, batch_size=len(x))
    assert_logits_close(other(x, training=True, freeze_bn_stats=True).numpy(),
                        other(x, training=False).numpy(),
                        "gated: recalibrated inference vs batch statistics", rel=1e-4)


def test_recalibration_pools_exact_population_statistics(resnet20):
    """Several unequal batches: the stem BN holds the exact mean/variance over all images."""
    model, spec, _ = resnet20
    slim = slim_model(model, spec)
    x = np.random.default_rng(7).normal(size=(50, 32, 32, 3)).astype(np.float32)
    info = recalibrate_batch_norm(slim, x, batch_size=16)  # 16+16+16+2
    assert info == {"images": 50, "batch_norms": 21}  # stem + 9 blocks x 2 + 2 projections
    conv = slim.get_layer("conv")(x).numpy().astype(np.float64)
    bn = slim.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), conv.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), conv.var(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    # The gated model re-estimated on the same images slims to the same network.
    other = gated("resnet20")
    other.set_weights(model.get_weights())
    spec.apply_to(other)
    recalibrate_batch_norm(other, x, batch_size=16)
    y = x[:8]
    assert_logits_close(slim_model(other)(y).numpy(), slim(y).numpy(),
                        "slim(recalibrated gated) vs recalibrated slim", rel=1e-4)


def test_recalibration_rejects_empty():
    with pytest.raises(ValueError, match="non-empty batch"):
        recalibrate_batch_norm(keras.Sequential([keras.layers.BatchNormalization()]),
                               np.zeros((0, 4, 4, 3), np.float32))


@pytest.fixture(scope="module")
def resnet56_data():
    if not all(os.path.exists(p) for p in (RES56, TRAIN, TEST1000)):
        pytest.skip(f"shared reference weights/data not found under {SHARED}")
    from ekg_tf.weights import load_weights
    model = gated("resnet56")
    load_weights(model, RES56)
    with np.load(TEST1000) as f:
        x_test, y_test = normalize(f["x"], "cifar10").numpy(), f["y"].astype(np.int64)
    with np.load(TRAIN) as f:
        # Training images only for BN re-estimation (never the test split).
        idx = np.random.default_rng(0).choice(len(f["y"]), 1024, replace=False)
        x_train = normalize(f["x"][np.sort(idx)], "cifar10").numpy()
    return model, x_test, y_test, x_train


def accuracy(model, x, y):
    logits = model.predict(x, batch_size=250, verbose=0)
    return float(np.mean(np.argmax(logits, 1) == y))


@needs_shared
def test_resnet56_dense_and_pruned(resnet56_data):
    model, x_test, y_test, x_train = resnet56_data
    # (The dense slim model's 93.40% accuracy is checked in test_export.py.)
    spec = l1_uniform_subnet(model, 0.45)
    assert ComplexityCounter(model).macs_ratio(spec.rates) <= 0.45
    slim = slim_model(model, spec)
    x = x_test[:200]
    assert_logits_close(model(x).numpy(), slim(x).numpy(), "resnet56 0.45 gated vs slim")
    acc_stale = accuracy(slim, x_test[:500], y_test[:500])
    recalibrate_batch_norm(slim, x_train, batch_size=256)
    acc_recal = accuracy(slim, x_test[:500], y_test[:500])
    # Spec section 9: stored statistics do not fit the slim network; re-estimating
    # them on training images restores a working network.
    assert acc_recal > acc_stale + 0.1, (acc_stale, acc_recal)
    folded = fold_batch_norm(slim)
    assert_logits_close(slim(x).numpy(), folded(x).numpy(), "resnet56 0.45 slim vs folded")
