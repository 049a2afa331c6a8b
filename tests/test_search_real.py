"""Real data: the published ResNet-56 on real CIFAR-10 through the search's evaluation code
(validation = last 32 training images per class; lossless test images)."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from conftest import CIFAR_TEST1000 as TEST
from conftest import CIFAR_TRAIN as TRAIN
from conftest import REFERENCE_NPZ as WEIGHTS
from conftest import SHARED

pytestmark = pytest.mark.skipif(
    not all(os.path.exists(p) for p in (WEIGHTS, TRAIN, TEST)),
    reason=f"needs the published weights and CIFAR-10 files under {SHARED}")


def test_published_resnet56_through_search_evaluation():
    from ekg_tf.data import normalize, reference_split_indices
    from ekg_tf.data.sources import load_npz
    from ekg_tf.models import build_model
    from ekg_tf.search import evaluator as ev
    from ekg_tf.search.objective import evaluate_logits
    from ekg_tf.weights import load_weights

    model = build_model("resnet56", 10)
    load_weights(model, WEIGHTS)
    train, test = load_npz(TRAIN), load_npz(TEST)
    val = reference_split_indices(train.y, 32, from_end=True)
    assert len(val) == 320
    val = val[np.random.default_rng(0).permutation(320)]
    xv = normalize(train.x[val], "cifar10").numpy()
    e = ev.SubnetEvaluator(model, xv, train.y[val], 256, cache_prefix=False)
    logits = e.refresh()
    m = evaluate_logits(logits, train.y[val], logits)
    assert m["accuracy"] >= 0.99 and m["loss"] < 0.05   # training images: near perfect
    rng = np.random.default_rng(1)
    order = rng.permutation(len(test))
    xt, yt = normalize(test.x[order], "cifar10").numpy(), test.y[order]
    # the data README measures 93.50% (BN training mode) and 93.40% (inference mode)
    assert ev.top1(ev.batch_logits(model, xt, 250, True), yt) == pytest.approx(0.935, abs=0.01)
    assert ev.top1(ev.batch_logits(model, xt, 250, False), yt) == pytest.approx(0.934, abs=0.005)
    # prune half of every block-internal gate: inference-mode BN statistics no longer fit;
    # re-estimating them on 1,024 *training* images gives a usable network
    for block in model.blocks:
        for g in block.inner_groups:
            g.rate = 0.5
    saved = ev.bn_statistics(model)
    xs, ys = xt[:500], yt[:500]
    stale = ev.top1(ev.batch_logits(model, xs, 250, False), ys)
    idx = rng.permutation(len(train))[:1024]
    ev.recalibrate_batch_norm(model, normalize(train.x[idx], "cifar10").numpy(), 256)
    recal = ev.top1(ev.batch_logits(model, xs, 250, False), ys)
    assert recal > 0.5 and recal >= stale, (stale, recal)
    ev.restore_bn_statistics(model, saved)
    np.testing.assert_array_equal(model.stem_bn.moving_mean.numpy(), saved[0][0])
