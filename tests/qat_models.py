"""Small Keras 3 networks for the QAT tests (test_qat.py and its subprocess scripts).

Not a test module. Both are plain, slimmed networks as the exporter and the QAT take
them, with non-trivial BN statistics (fresh ones are 0/1 and hide conversion mistakes):
- `resnet8_slim()`: the built-in ResNet-8 (the ResNet family's residual blocks, projection
  shortcuts and stages at the smallest depth) at a random sub-network (random ranks and
  rates), physically pruned;
- `depthwise_slim()`: a MobileNet/EfficientNet-style network pruned at random rates:
  depthwise and separable convolutions, a Concatenate, a squeeze-and-excitation
  Multiply, an Add, LayerNormalization-free (tfmot has no int8 LayerNorm), ReLU6 and
  swish activations.
"""
import keras
import numpy as np

SIZE = 32


def _slim(model, seed):
    from ekg_tf.graph.gated import GatedModel
    from ekg_tf.slimming import slim_model
    from random_subnets import random_subnet, randomize_batch_norm
    gated = GatedModel(model)
    rng = np.random.default_rng(seed)
    randomize_batch_norm(gated, rng)
    return slim_model(gated, random_subnet(gated, rng, min_rate=0.3)), gated


def resnet8_slim(seed=0):
    from ekg_tf.models import build_model
    return _slim(build_model("resnet8", 10), seed)


def depthwise_model(classes=10):
    L = keras.layers
    inputs = keras.Input((SIZE, SIZE, 3), name="images")
    x = L.ReLU(6.0, name="stem_relu")(L.BatchNormalization(name="stem_bn")(
        L.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem")(inputs)))
    d = L.ReLU(6.0, name="dw_relu")(L.BatchNormalization(name="dw_bn")(
        L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)))
    d = L.BatchNormalization(name="pw_bn")(L.Conv2D(16, 1, use_bias=False, name="pw")(d))
    x = L.Add(name="add")([x, d])
    s = L.Activation("swish", name="sep_act")(L.BatchNormalization(name="sep_bn")(
        L.SeparableConv2D(12, 3, padding="same", use_bias=False, name="sep")(x)))
    c = L.Concatenate(name="concat")([x, s])
    e = L.GlobalAveragePooling2D(keepdims=True, name="se_pool")(c)
    e = L.Conv2D(8, 1, activation="relu", name="se_reduce")(e)
    e = L.Conv2D(28, 1, activation="sigmoid", name="se_expand")(e)
    c = L.Multiply(name="se_scale")([c, e])
    c = L.MaxPooling2D(2, name="pool")(c)
    x = L.Dropout(0.2, name="drop")(L.GlobalAveragePooling2D(name="gap")(c))
    return keras.Model(inputs, L.Dense(classes, name="logits")(x), name="depthwise_net")


def depthwise_slim(seed=1):
    return _slim(depthwise_model(), seed)


def images(n, seed=0):
    """Model-ready (normalised-scale) float32 images."""
    return np.random.default_rng(seed).normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)
