"""Data sources and pipelines: formats, errors, determinism, exact resume, global batch."""
import socket

import numpy as np
import pytest
import tensorflow as tf

from ekg_tf.config import data_config
from ekg_tf.data import DataError, input_fn, load_arrays, reference_split_indices
from ekg_tf.data.pipeline import steps_per_epoch
from ekg_tf.data.sources import load_folder, synthetic_split


def _cfg(**kw):
    cfg = data_config()
    cfg.update(kw)
    return cfg


def test_synthetic_is_deterministic_and_labelled():
    a, b = synthetic_split(64), synthetic_split(64)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.x.dtype == np.uint8 and a.x.shape == (64, 32, 32, 3)
    assert sorted(set(a.y.tolist())) == list(range(10))


def test_npz_errors(tmp_path):
    with pytest.raises(DataError, match="test_path '/no/such.npz' does not exist"):
        load_arrays(_cfg(source="npz", test_path="/no/such.npz"), "test")
    with pytest.raises(DataError, match="train_path is not set"):
        load_arrays(_cfg(source="npz"), "train")
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="needs arrays 'x' and 'y'"):
        load_arrays(_cfg(source="npz", test_path=str(tmp_path / "wrong.npz")), "test")
    np.savez(tmp_path / "labels.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.array([0, 12]))
    with pytest.raises(DataError, match="does not fit 10 classes"):
        load_arrays(_cfg(source="npz", test_path=str(tmp_path / "labels.npz")), "test")
    with pytest.raises(DataError, match="unknown data.source 'csv'"):
        load_arrays(_cfg(source="csv"), "test")


def test_folder_source(tmp_path):
    split = synthetic_split(6, num_classes=2)
    for i, (img, label) in enumerate(zip(split.x, split.y)):
        d = tmp_path / f"class_{label}"
        d.mkdir(exist_ok=True)
        (d / f"{i}.png").write_bytes(tf.io.encode_png(img).numpy())
    arrays = load_folder(str(tmp_path))
    assert arrays.x.shape == (6, 32, 32, 3)
    order = np.argsort([f"{y}_{i}" for i, y in enumerate(split.y)], kind="stable")
    assert sorted(arrays.y.tolist()) == sorted(split.y.tolist())
    assert {tuple(im.ravel()[:8]) for im in arrays.x} == {tuple(im.ravel()[:8]) for im in split.x[order]}
    with pytest.raises(DataError, match="no class sub-folders"):
        load_folder(str(tmp_path / "class_0"))


def test_reference_split_indices():
    labels = np.repeat(np.arange(3), 5)
    np.testing.assert_array_equal(reference_split_indices(labels, 2, from_end=True),
                                  [3, 4, 8, 9, 13, 14])
    np.testing.assert_array_equal(reference_split_indices(labels, 1, from_end=False), [0, 5, 10])


def test_pipeline_resume_is_exact_and_epochs_reshuffle():
    cfg = _cfg(source="synthetic", name="synthetic", synthetic_train_size=96)
    fn, n = input_fn(cfg, "train", True, 16, epochs=2, with_index=True, seed=7)
    batches = list(fn(None))
    assert n == 96 and len(batches) == 2 * steps_per_epoch(96, 16)
    fn_resumed, _ = input_fn(cfg, "train", True, 16, epochs=2, with_index=True, seed=7,
                             start_epoch=1, skip_batches=2)
    resumed = list(fn_resumed(None))
    assert len(resumed) == 4
    for a, b in zip(batches[8:], resumed):
        np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
        np.testing.assert_array_equal(a[2].numpy(), b[2].numpy())
    first = np.concatenate([b[2].numpy() for b in batches[:6]])
    second = np.concatenate([b[2].numpy() for b in batches[6:]])
    assert sorted(first) == list(range(96)) and not np.array_equal(first, second)


def test_per_replica_batch_and_sharding():
    cfg = _cfg(source="synthetic", name="synthetic", synthetic_train_size=64)
    fn, _ = input_fn(cfg, "train", True, 16, with_index=True, seed=1)
    seen = []
    for pipeline_id in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                         num_replicas_in_sync=2)
        batches = list(fn(ctx))
        assert all(b[0].shape[0] == 8 for b in batches)  # 16 global / 2 replicas
        seen.append(np.concatenate([b[2].numpy() for b in batches]))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen).tolist()) == list(range(64))


def test_views_and_eval_preprocessing_is_exact_normalisation():
    cfg = _cfg(source="synthetic", name="synthetic", synthetic_test_size=8)
    fn, _ = input_fn(cfg, "test", False, 8)
    images, _ = next(iter(fn(None)))
    raw = load_arrays(cfg, "test").x
    expected = (raw.astype(np.float32) - [113.9, 123.0, 125.3]) / [66.7, 62.1, 63.0]
    np.testing.assert_allclose(images.numpy(), expected, rtol=1e-5, atol=1e-5)
    fn2, _ = input_fn(cfg, "test", True, 8, views=2, jitter=True, shuffle=False)
    two = next(iter(fn2(None)))[0].numpy()
    assert two.shape == (8, 2, 32, 32, 3) and not np.allclose(two[:, 0], two[:, 1])


def _network_available():
    try:
        socket.create_connection(("www.cs.toronto.edu", 443), timeout=3).close()
        return True
    except OSError:
        return False


def test_tfds_without_network_says_how_to_use_npz(tmp_path):
    if _network_available():
        pytest.skip("this machine has network access; the offline error cannot be produced")
    cfg = _cfg(source="tfds", name="cifar10", tfds_data_dir=str(tmp_path))
    with pytest.raises(DataError) as e:
        load_arrays(cfg, "train")
    message = str(e.value)
    assert "could not prepare TFDS dataset 'cifar10'" in message
    assert "--config.data.source=npz" in message and "folder" in message


def test_imagenet_tfds_with_missing_manual_dir_is_a_clear_error(tmp_path):
    cfg = _cfg(source="tfds", name="imagenet2012", image_size=224,
               tfds_data_dir=str(tmp_path / "tfds"), tfds_manual_dir=str(tmp_path / "no_tars"))
    with pytest.raises(DataError) as e:
        input_fn(cfg, "train", True, 8)
    message = str(e.value)
    assert "could not prepare TFDS dataset 'imagenet2012'" in message
    assert "tfds_manual_dir" in message
