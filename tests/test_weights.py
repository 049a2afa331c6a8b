"""Import of the reference's published ResNet-56: accuracy on real CIFAR-10, and bad files."""
import os
import pickle

import numpy as np
import pytest

from ekg_tf.data import normalize
from ekg_tf.graph.gated import GatedModel
from ekg_tf.models import build_model
from ekg_tf.weights import WeightsError, load_weights, read_reference_pickle


def _top1(model, path, training):
    with np.load(path) as f:
        x, y = f["x"], f["y"]
    x = normalize(x, "cifar10")
    preds = []
    for i in range(0, len(y), 250):
        logits = model(x[i:i + 250], training=training, freeze_bn_stats=True)
        preds.append(np.argmax(logits, -1))
    return float(np.mean(np.concatenate(preds) == y)), model(x[:8]).numpy()


@pytest.fixture(scope="module")
def reference_pkl(reference_npz, tmp_path_factory):
    """The original .pkl format: a pickled dict of numpy arrays (as published)."""
    with np.load(reference_npz) as f:
        arrays = {k: f[k] for k in f.files}
    path = tmp_path_factory.mktemp("pkl") / "res56_cifar10.pkl"
    with open(path, "wb") as fh:
        pickle.dump(arrays, fh)
    return str(path)


def test_published_resnet56_accuracy_npz_and_pkl(reference_npz, reference_pkl, cifar_test1000):
    model = GatedModel(build_model("resnet56", 10))  # batch statistics without updates
    load_weights(model, reference_npz)
    top1, logits_npz = _top1(model, cifar_test1000, training=False)
    # The reference measures 93.40% (BN inference mode) on these 1,000 lossless images; a
    # wrong normalisation or BN epsilon costs a point or more. (Batch statistics, 93.50% in
    # the reference: test_cli's `ekg-eval --bn_mode=both` on the same weights.)
    assert abs(top1 - 0.934) <= 0.003, top1
    # The .pkl loader gives the same network: every weight and the logits are identical.
    model_pkl = GatedModel(build_model("resnet56", 10))
    load_weights(model_pkl, reference_pkl)
    for a, b in zip(model.weights, model_pkl.weights):
        np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=a.path)
    with np.load(cifar_test1000) as f:
        x = normalize(f["x"][:8], "cifar10")
    np.testing.assert_array_equal(model_pkl(x).numpy(), logits_npz)


class _NotAnArray:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_an_object_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"conv/kernel:0": _NotAnArray()}, fh)
    with pytest.raises(WeightsError, match="refusing to unpickle posix.system|refusing to unpickle"):
        read_reference_pickle(str(path))


def test_pickle_of_a_non_array_value_is_refused(tmp_path):
    path = tmp_path / "str.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"conv/kernel:0": "text"}, fh)
    with pytest.raises(WeightsError, match="not an array"):
        read_reference_pickle(str(path))


def test_weights_of_another_arch_are_refused(reference_npz):
    model = build_model("resnet20", 10)
    with pytest.raises(WeightsError, match="another architecture"):
        load_weights(model, reference_npz)


def test_corrupted_npz_is_a_clear_error(reference_npz, tmp_path):
    path = tmp_path / "broken.npz"
    with open(reference_npz, "rb") as f:
        path.write_bytes(f.read()[:5000])
    with pytest.raises(WeightsError, match="not a readable .npz"):
        load_weights(build_model("resnet56", 10), str(path))


def test_missing_extra_and_misshaped_arrays_name_the_variable(reference_npz, tmp_path):
    with np.load(reference_npz) as f:
        arrays = {k: f[k] for k in f.files}
    model = build_model("resnet56", 10)
    missing = dict(arrays)
    del missing["BasicBlock2.3/bn1/gamma:0"]
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(WeightsError, match="block2_3_bn1/gamma"):
        load_weights(model, str(tmp_path / "missing.npz"))
    extra = dict(arrays, **{"BasicBlock9.0/conv1/kernel:0": np.zeros(3)})
    np.savez(tmp_path / "extra.npz", **extra)
    with pytest.raises(WeightsError, match="BasicBlock9.0/conv1/kernel:0"):
        load_weights(model, str(tmp_path / "extra.npz"))
    bad = dict(arrays, **{"fc/kernel:0": np.zeros((32, 10), np.float32)})
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(WeightsError, match=r"fc/kernel:0.*\(32, 10\).*\(64, 10\)"):
        load_weights(model, str(tmp_path / "bad.npz"))


def test_missing_file_is_a_clear_error():
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(build_model("resnet20", 10), "/nonexistent/weights.npz")
