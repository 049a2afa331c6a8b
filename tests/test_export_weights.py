"""Which weights ekg-export uses, and how each kind becomes the slim model (export.weights_io)."""
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ekg_tf.graph.gated import GatedModel  # noqa: E402
from ekg_tf.models import build_model  # noqa: E402
from ekg_tf.slimming import slim_model  # noqa: E402
from ekg_tf.subnet import SubnetSpec  # noqa: E402
from ekg_tf.errors import UserError  # noqa: E402
from ekg_tf.export.weights_io import find_weights, load_slim  # noqa: E402
from random_subnets import random_subnet  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import synthetic
    config = synthetic.get_config()
    wd = tmp_path_factory.mktemp("weights_wd")
    model = GatedModel(build_model("resnet8", 10))
    rng = np.random.default_rng(0)
    spec = random_subnet(model, rng, min_rate=0.3)
    x = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    return config, wd, model, spec, x


def test_gated_weights_are_slimmed(setup):
    config, wd, model, spec, x = setup
    path = str(wd / "gated.weights.h5")
    model.base.save_weights(path)
    slim, gated = load_slim(config, spec, path)
    assert gated is not None  # gated weights: the CLI re-estimates BN statistics
    np.testing.assert_allclose(slim(x).numpy(), model(x).numpy(), atol=1e-5)


def test_slim_weights_and_keras_files_are_loaded_as_is(setup):
    config, wd, model, spec, x = setup
    slim = slim_model(model, spec)
    slim.get_layer("fc").bias.assign(np.arange(10, dtype=np.float32))  # "fine-tuned"
    h5, keras_path = str(wd / "slim.weights.h5"), str(wd / "slim.keras")
    slim.save_weights(h5)
    slim.save(keras_path)
    for path in (h5, keras_path):
        loaded, gated = load_slim(config, spec, path)
        assert gated is None
        np.testing.assert_array_equal(loaded(x).numpy(), slim(x).numpy())
    other = SubnetSpec.from_dict({**spec.to_dict(), "groups": {
        n: {**g, "rate": 1.0} for n, g in spec.to_dict()["groups"].items()}})
    with pytest.raises(ValueError, match="do not fit the sub-network"):
        load_slim(config, other, keras_path)


def test_find_weights(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        find_weights(str(tmp_path), str(tmp_path / "nope.npz"), "")
    assert find_weights(str(tmp_path), None, "init.npz") == ("init.npz", False)
    os.makedirs(tmp_path / "search")
    (tmp_path / "search" / "weights.weights.h5").write_text("x")
    assert find_weights(str(tmp_path), None, "init.npz") == (
        str(tmp_path / "search" / "weights.weights.h5"), False)
    os.makedirs(tmp_path / "finetune")
    (tmp_path / "finetune" / "best.weights.h5").write_text("x")
    (tmp_path / "finetune" / "last.keras").write_text("x")
    assert find_weights(str(tmp_path), None, "init.npz") == (
        str(tmp_path / "finetune" / "last.keras"), True)
    (tmp_path / "finetune" / "best.keras").write_text("x")
    assert find_weights(str(tmp_path), None, "init.npz") == (
        str(tmp_path / "finetune" / "best.keras"), True)
    with pytest.raises(Exception, match="no weights"):
        find_weights(str(tmp_path / "other"), None, "")
