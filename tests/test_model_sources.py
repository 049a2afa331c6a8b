"""Where a model comes from (config.model): a built-in ResNet, a .keras file loaded in safe
mode, keras.applications.<Name> with its own preprocessing and weights from a file."""
import keras
import numpy as np
import pytest

from ekg_tf.config import base_config, resolve
from ekg_tf.data.preprocessing import normalization_for
from ekg_tf.models.sources import ModelSourceError, model_from_config, model_identity


def config_for(init, init_weights="", image_size=32):
    config = base_config()
    config.model.init = init
    config.model.init_weights = init_weights
    config.data.image_size = image_size
    return resolve(config)


def test_builtin_arch_is_the_default():
    model = model_from_config(config_for(""))
    assert model.name == "resnet56" and model_identity(config_for("")) == "resnet56"


def test_keras_file_round_trip(tmp_path):
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))
    original = keras.Model(inputs, outputs, name="mine")
    path = str(tmp_path / "mine.keras")
    original.save(path)
    loaded = model_from_config(config_for(path))
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x).numpy(), original(x).numpy())
    with pytest.raises(ModelSourceError, match="does not exist"):
        model_from_config(config_for(str(tmp_path / "missing.keras")))


def test_application_with_local_weights_and_its_preprocessing(tmp_path):
    config = config_for("keras.applications.MobileNetV2")
    assert config.data.normalization == "keras.applications.MobileNetV2"
    norm = normalization_for(config.data.normalization)
    assert norm.mean == (127.5,) * 3 and norm.std == (127.5,) * 3 and not norm.bgr
    first = model_from_config(config)
    assert first.output.shape[-1] == 10 and first.layers[-1].activation.__name__ == "linear"
    path = str(tmp_path / "mbv2.weights.h5")
    first.save_weights(path)
    again = model_from_config(config_for("keras.applications.MobileNetV2", path))
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(again(x).numpy(), first(x).numpy())
    assert normalization_for("keras.applications.ResNet50").bgr  # 'caffe': BGR, mean only


def test_application_errors_say_what_to_do():
    with pytest.raises(ModelSourceError, match="init_weights .*does not exist"):
        model_from_config(config_for("keras.applications.MobileNetV2", "/nope.weights.h5"))
    with pytest.raises(ModelSourceError, match="MobileNetV2: .*input"):
        model_from_config(config_for("keras.applications.MobileNetV2", image_size=16))


def test_imagenet_weights_without_network_is_a_clear_error():
    from ekg_tf.data.sources import _host_resolves
    if _host_resolves("storage.googleapis.com"):
        pytest.skip("this machine has network: the ImageNet weights would download")
    with pytest.raises(ModelSourceError, match="ImageNet weights.*needs network.*init_weights"):
        model_from_config(config_for("keras.applications.MobileNetV2", "imagenet"))


def test_bn_momentum_override():
    config = config_for("keras.applications.MobileNetV2")
    config.model.bn_momentum = 0.9
    model = model_from_config(config)
    momenta = {layer.momentum for layer in model.layers
               if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == {0.9}
    config.model.bn_momentum = 1.5
    with pytest.raises(ModelSourceError, match="bn_momentum must be in"):
        model_from_config(config)
