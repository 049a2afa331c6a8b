"""Memory bank: teacher logits on disk (float16 shards, top-k option), paired with the
training-split index through a shuffled tf.data pipeline."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

from ekg_tf.errors import UserError
from ekg_tf.graph.gated import GatedModel
from ekg_tf.models import build_model
from ekg_tf.subnet_search.memory_bank import (MemoryBank, build_memory_bank, bytes_per_image,
                                       compress_topk)
from ekg_tf.slimming import batch_norm_layers


def _entry(model, rates, step, loss):
    return {"step": step, "loss": loss, "rates": rates,
            "ranks": {g.name: list(range(g.channels)) for g in model.gate_groups}}


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    rng = np.random.default_rng(0)
    model = GatedModel(build_model("resnet20", 10))
    for bn in batch_norm_layers(model):
        bn.gamma.assign(rng.uniform(0.5, 1.5, bn.gamma.shape).astype(np.float32))
    names = [g.name for g in model.gate_groups]
    teachers = [_entry(model, {n: 1.0 for n in names}, 0, 0.1),
                _entry(model, {n: 0.5 for n in names}, 3, 0.4)]
    x = rng.normal(size=(70, 32, 32, 3)).astype(np.float32)
    # batches in split order (as the memory-bank pipeline streams them), last one short
    batches = [(x[i:i + 32], None, np.arange(i, min(i + 32, 70))) for i in range(0, 70, 32)]
    out = str(tmp_path_factory.mktemp("bank"))
    meta = build_memory_bank(model, teachers, batches, 70, out, shard_size=25)
    expected = np.zeros((70, 10, 2), np.float32)
    for t, e in enumerate(teachers):
        for g in model.gate_groups:
            g.rate = e["rates"][g.name]
        for i in range(0, 70, 32):
            expected[i:i + 32, :, t] = model(x[i:i + 32], training=True,
                                             freeze_bn_stats=True).numpy()
    return out, meta, expected, model, teachers, batches


def test_dense_bank_roundtrip_and_size(bank):
    out, meta, expected = bank[:3]
    mb = MemoryBank.open(out)
    assert (mb.num_examples, mb.num_classes, mb.num_teachers) == (70, 10, 2)
    assert meta["num_shards"] == 3 and mb.bytes_per_image == 10 * 2 * 2
    assert sorted(f for f in os.listdir(out) if f.startswith("logits")) == [
        "logits-00000.npy", "logits-00001.npy", "logits-00002.npy"]
    idx = np.array([69, 0, 26, 25, 3, 50])
    got = mb.lookup(idx)
    assert got.dtype == np.float32 and got.shape == (6, 10, 2)
    np.testing.assert_allclose(got, expected[idx], rtol=2e-3, atol=2e-3)  # float16 storage
    assert meta["teachers"][0]["loss"] == 0.1   # teacher 0 = lowest loss


def test_bank_in_a_shuffled_tf_data_pipeline(bank):
    out, _, expected = bank[:3]
    mb = MemoryBank.open(out)
    ds = tf.data.Dataset.range(70).shuffle(70, seed=3).map(
        lambda i: (tf.zeros([2]), tf.cast(i % 10, tf.int32), i)).batch(16)
    ds = ds.map(mb.attach_fn())
    seen = 0
    for _, _, logits in ds:
        assert logits.shape[1:] == (10, 2)
        seen += logits.shape[0]
    assert seen == 70
    for _, _, index in tf.data.Dataset.range(70).shuffle(70, seed=4).map(
            lambda i: (0, 0, i)).batch(16).take(2):
        np.testing.assert_allclose(mb.tf_lookup(index).numpy(), expected[index.numpy()],
                                   rtol=2e-3, atol=2e-3)


def test_topk_keeps_top_classes_and_tail_mass():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, size=(5, 100))
    k, temp = 10, 4.0
    values, idx, tail = compress_topk(logits, k, temp)
    dense = np.repeat(tail.astype(np.float64)[:, None], 100, 1)
    np.put_along_axis(dense, idx.astype(np.int64), values.astype(np.float64), 1)

    def softmax(z):
        e = np.exp(z / temp - (z / temp).max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    p, q = softmax(logits), softmax(dense)
    top = np.argsort(-logits, 1)[:, :k]
    np.testing.assert_allclose(np.take_along_axis(q, top, 1), np.take_along_axis(p, top, 1),
                               rtol=2e-2)
    tail_p = 1 - np.take_along_axis(p, top, 1).sum(1)
    tail_q = 1 - np.take_along_axis(q, top, 1).sum(1)
    np.testing.assert_allclose(tail_q, tail_p, rtol=2e-2, atol=1e-3)
    # ImageNet-scale sizes stated in the docs
    assert bytes_per_image(1000, 5) == 10_000
    assert bytes_per_image(1000, 5, topk=20) == 410


def test_topk_bank_lookup(bank, tmp_path):
    model = bank[3]
    names = [g.name for g in model.gate_groups]
    teachers = [{"step": 0, "loss": 0.1, "rates": {n: 1.0 for n in names},
                 "ranks": {g.name: list(range(g.channels)) for g in model.gate_groups}}]
    x = np.random.default_rng(0).normal(size=(32, 32, 32, 3)).astype(np.float32)
    build_memory_bank(model, teachers, [(x, None, np.arange(32))], 32, str(tmp_path), topk=3,
                      sliced=False)   # the masked path (the dense fixture uses the slim one)
    mb = MemoryBank.open(str(tmp_path))
    for g in model.gate_groups:
        g.rate = 1.0
    full = model(x, training=True, freeze_bn_stats=True).numpy()
    got = mb.lookup(np.arange(32))[:, :, 0]
    top = np.argsort(-full, 1)[:, :3]
    np.testing.assert_allclose(np.take_along_axis(got, top, 1), np.take_along_axis(full, top, 1),
                               rtol=2e-3, atol=2e-3)
    assert mb.bytes_per_image == 3 * 4 + 2


@pytest.mark.parametrize("precision, tolerance", [("mixed_bfloat16", 0.02),
                                                   ("mixed_float16", 0.005)])
def test_reduced_precision_bank_within_tolerance_of_float32(bank, tmp_path, precision,
                                                            tolerance):
    # Teachers computed in bfloat16 / float16 (search.memory_bank_precision): every logit
    # within `tolerance` of the logits' scale (max |logit|) of the float32 ones. Measured:
    # 0.8% (bfloat16, 8-bit mantissa) and 0.17% (float16) on this random ResNet-20.
    out, _, _, model, teachers, batches = bank
    meta = build_memory_bank(model, teachers, batches, 70, str(tmp_path), shard_size=25,
                             precision=precision)
    assert meta["precision"] == precision and MemoryBank.open(out).meta["precision"] == \
        "float32"
    idx = np.arange(70)
    reduced, full = MemoryBank.open(str(tmp_path)).lookup(idx), MemoryBank.open(out).lookup(idx)
    diff = np.abs(reduced - full).max() / np.abs(full).max()
    assert 0 < diff < tolerance   # > 0: the layers did compute in the reduced dtype


def test_teachers_in_turn_equal_teachers_overlapped(bank):
    # The teachers' forwards as one graph: overlapped (CPU) or chained in turn (the GPU
    # default) compute the same logits, and each equals that sub-network alone.
    from ekg_tf.subnet_search.evaluator import kept_indices_of, subnets_logits_fn
    _, _, _, model, teachers, batches = bank
    kept = [kept_indices_of(model, e) for e in teachers]
    x = tf.constant(batches[0][0])
    overlapped = subnets_logits_fn(model, kept, overlap=True)(x).numpy()
    in_turn = subnets_logits_fn(model, kept, overlap=False)(x).numpy()
    np.testing.assert_allclose(in_turn, overlapped, rtol=0, atol=1e-6)
    for t in range(len(kept)):
        alone = subnets_logits_fn(model, kept[t:t + 1])(x).numpy()[..., 0]
        np.testing.assert_allclose(alone, overlapped[..., t], rtol=1e-5, atol=1e-5)


def test_unknown_bank_precision_is_a_clear_error(bank, tmp_path):
    _, _, _, model, teachers, batches = bank
    with pytest.raises(UserError, match="search.memory_bank_precision 'bf16'"):
        build_memory_bank(model, teachers, batches, 70, str(tmp_path), precision="bf16")


def test_incomplete_bank_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        MemoryBank.open(str(tmp_path))
