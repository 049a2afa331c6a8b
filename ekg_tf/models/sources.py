"""Where a model comes from: a built-in ResNet, a `.keras` file, or `keras.applications`.

`build_from_config(config)` returns the plain Keras model described by
`config.model` (with `config.data.image_size` and the class count of the data):
- `model.init = "path/model.keras"`: the saved model, loaded with `safe_mode=True` and
  no custom objects (a file that needs them is refused with what to do instead);
- `model.init = "keras.applications.<Name>"`: that architecture at the configured
  input size with logits outputs; weights from `model.init_weights`: "" (random),
  "imagenet" (downloads, needs network; for another class count the ImageNet
  backbone gets a new GlobalAveragePooling2D + Dense head), or a local
  `.weights.h5` of this very model;
- otherwise `model.arch` (`resnet8` ... `resnet50`), with `model.init` as weights
  (`.npz`/`.pkl` of the reference, `.weights.h5`, a checkpoint) loaded by the caller.
"""
from __future__ import annotations

import os

import keras

from ekg_tf.config import APPLICATIONS_PREFIX
from ekg_tf.errors import UserError
from ekg_tf.models.resnet import build_model


class ModelSourceError(UserError):
    """`model.init` / `model.arch` name no model that can be built (says what to fix)."""


def model_kind(init: str) -> str:
    """'keras_file', 'application' or 'builtin' (weights, if any, come from `init`)."""
    if init.startswith(APPLICATIONS_PREFIX):
        return "application"
    if init.endswith(".keras"):
        return "keras_file"
    return "builtin"


def load_keras_file(path: str) -> keras.Model:
    """A `.keras` model file, loaded in safe mode (no arbitrary code, no custom objects)."""
    if not os.path.exists(path):
        raise ModelSourceError(f"model.init {path!r} does not exist")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except (TypeError, ValueError) as e:
        text = str(e).splitlines()[0][:300]
        if "custom" in text.lower() or "could not locate" in text.lower() or \
                "unknown" in text.lower() or "deserializ" in text.lower():
            raise ModelSourceError(
                f"{path} needs custom objects to load ({text}); ekg_tf loads .keras files "
                "with safe_mode and no custom objects: save the model with built-in Keras "
                "layers only, or build it in Python and call ekg_tf.prune(model, ...)") from None
        raise ModelSourceError(f"{path} is not a loadable .keras model ({text})") from None


def application(name: str, input_shape, num_classes: int, weights: str = "") -> keras.Model:
    """`keras.applications.<name>` at `input_shape` with `num_classes` logits."""
    attr = name[len(APPLICATIONS_PREFIX):] if name.startswith(APPLICATIONS_PREFIX) else name
    constructor = getattr(keras.applications, attr, None)
    known = sorted(n for n in dir(keras.applications) if n[:1].isupper())
    if constructor is None or not callable(constructor) or not attr[:1].isupper():
        raise ModelSourceError(f"keras.applications has no model {attr!r}; known: "
                               f"{', '.join(known)}")
    input_shape = tuple(int(d) for d in input_shape)
    try:
        if weights == "imagenet" and num_classes != 1000:
            # The ImageNet backbone in a model of the user's shape: new pooled dense head.
            backbone = constructor(include_top=False, weights="imagenet",
                                   input_shape=input_shape)
            inputs = keras.Input(input_shape, name="images")
            x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(backbone(inputs))
            logits = keras.layers.Dense(num_classes, name="logits")(x)
            return keras.Model(inputs, logits, name=f"{backbone.name}_head{num_classes}")
        model = constructor(include_top=True,
                            weights="imagenet" if weights == "imagenet" else None,
                            input_shape=input_shape, classes=num_classes,
                            classifier_activation=None)
    except ValueError as e:  # Keras' own checks: input size, classes with weights
        raise ModelSourceError(f"{attr}: {str(e).splitlines()[0][:300]}") from None
    except Exception as e:  # the ImageNet weights download
        if weights != "imagenet":
            raise
        raise ModelSourceError(
            f"{attr}: could not get the ImageNet weights ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); this needs network access. Without it, set "
            "model.init_weights to a local .weights.h5 of this model (or leave it empty for "
            "random weights)") from None
    if weights and weights != "imagenet":
        if not os.path.exists(weights):
            raise ModelSourceError(f"model.init_weights {weights!r} does not exist")
        try:
            model.load_weights(weights)
        except Exception as e:
            raise ModelSourceError(f"model.init_weights {weights}: does not fit {model.name} "
                                   f"({str(e).splitlines()[0][:200]})") from None
    return model


def build_from_config(config) -> keras.Model:
    """The plain model of `config.model` (see the module docstring)."""
    from ekg_tf.data.sources import num_classes_for
    size = int(config.data.image_size)
    init = str(config.model.init or "")
    kind = model_kind(init)
    if kind == "keras_file":
        return load_keras_file(init)
    if kind == "application":
        return application(init, (size, size, 3), num_classes_for(config.data),
                           str(config.model.get("init_weights", "") or ""))
    try:
        return build_model(config.model.arch, num_classes_for(config.data),
                           input_shape=(size, size, 3))
    except ValueError as e:
        raise ModelSourceError(str(e)) from None


def set_batch_norm_momentum(model, momentum: float) -> None:
    """Sets the moving-average momentum of every BatchNormalization in `model`."""
    from ekg_tf.graph.keras_compat import all_layers
    if not 0.0 < momentum < 1.0:
        raise ModelSourceError(f"model.bn_momentum must be in (0, 1) (or 0 to keep the "
                               f"model's own), got {momentum}")
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = float(momentum)


def model_from_config(config, load_init: bool = True) -> keras.Model:
    """`build_from_config` plus, for a built-in architecture, the weights of `model.init`,
    and `model.bn_momentum`."""
    model = build_from_config(config)
    if float(config.model.get("bn_momentum", 0.0) or 0.0):
        set_batch_norm_momentum(model, float(config.model.bn_momentum))
    init = str(config.model.init or "")
    if load_init and init and model_kind(init) == "builtin":
        from ekg_tf.weights import load_weights
        load_weights(model, init)
    return model


def model_identity(config) -> str:
    """What names the model in fingerprints: the architecture, file or application."""
    init = str(config.model.init or "")
    if model_kind(init) == "builtin":
        return str(config.model.arch)
    if model_kind(init) == "keras_file":
        return os.path.abspath(init)
    return f"{init}|{config.model.get('init_weights', '')}"
