"""The reference's ResNets as plain functional Keras models.

CIFAR ResNet-8/20/32/56/110 (3x3 stem, stages 16/32/64) and ImageNet
ResNet-18/34/50 (7x7/2 stem + 3x3/2 max-pool, stages 64..512), as the EKG
reference builds them: projection shortcuts (1x1 conv + BN) where stride or width
changes, the last BN of each block starts at gamma = 0, BN epsilon 1e-5 and
momentum 0.9, 'SAME' convolutions without bias, conv init VarianceScaling(2,
fan_out), classifier init N(0, 0.01). Nothing here is specific to pruning: the
channel groups (one residual-stream group per stage, one group per block-internal
conv) are derived by `ekg_tf.graph.dependency_graph` like for any other model.

Layer names follow the reference's variables: `conv`/`bn` (stem), then
`block{stage}_{block}_conv1`, `..._bn1`, ..., `..._conv3`/`..._bn3` (projection),
`fc`; the reference's `BasicBlock{s}.{b}/conv1/kernel:0` is our
`block{s}_{b}_conv1/kernel` (see `ekg_tf.weights`).
"""
from __future__ import annotations

import dataclasses

import keras

from ekg_tf.errors import UserError

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class ResNetArch:
    name: str
    blocks: tuple
    widths: tuple
    strides: tuple
    bottleneck: bool
    imagenet_stem: bool

    @property
    def expansion(self) -> int:
        return 4 if self.bottleneck else 1

    @property
    def default_input_shape(self) -> tuple:
        return (224, 224, 3) if self.imagenet_stem else (32, 32, 3)


_CIFAR = dict(widths=(16, 32, 64), strides=(1, 2, 2), bottleneck=False, imagenet_stem=False)
_IMAGENET = dict(widths=(64, 128, 256, 512), strides=(1, 2, 2, 2), imagenet_stem=True)

ARCHS = {
    # ResNet-8 (one block per stage): the smallest CIFAR ResNet of the family, for tests
    # and quick experiments.
    "resnet8": ResNetArch("resnet8", (1, 1, 1), **_CIFAR),
    "resnet20": ResNetArch("resnet20", (3, 3, 3), **_CIFAR),
    "resnet32": ResNetArch("resnet32", (5, 5, 5), **_CIFAR),
    "resnet56": ResNetArch("resnet56", (9, 9, 9), **_CIFAR),
    "resnet110": ResNetArch("resnet110", (18, 18, 18), **_CIFAR),
    "resnet18": ResNetArch("resnet18", (2, 2, 2, 2), bottleneck=False, **_IMAGENET),
    "resnet34": ResNetArch("resnet34", (3, 4, 6, 3), bottleneck=False, **_IMAGENET),
    "resnet50": ResNetArch("resnet50", (3, 4, 6, 3), bottleneck=True, **_IMAGENET),
}


def get_arch(name: str) -> ResNetArch:
    try:
        return ARCHS[name.lower()]
    except KeyError:
        raise UserError(f"unknown architecture {name!r}; choose one of {sorted(ARCHS)}") from None


def _conv_bn(x, filters, kernel, strides, name, bn_name, gamma_zero=False):
    x = keras.layers.Conv2D(
        filters, kernel, strides, padding="same", use_bias=False, name=name,
        kernel_initializer=keras.initializers.VarianceScaling(2.0, mode="fan_out"))(x)
    return keras.layers.BatchNormalization(
        epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=bn_name,
        gamma_initializer="zeros" if gamma_zero else "ones")(x)


def _block(x, width, strides, in_channels, bottleneck, prefix):
    """A basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) block with its shortcut."""
    out_channels = width * (4 if bottleneck else 1)
    shortcut = x
    if strides > 1 or in_channels != out_channels:
        shortcut = _conv_bn(x, out_channels, 1, strides, f"{prefix}_conv3", f"{prefix}_bn3")
    if bottleneck:
        convs = [("0", 1, 1, width), ("1", 3, strides, width), ("2", 1, 1, out_channels)]
    else:
        convs = [("1", 3, strides, width), ("2", 3, 1, out_channels)]
    y = x
    for i, (index, kernel, stride, filters) in enumerate(convs):
        last = i == len(convs) - 1
        y = _conv_bn(y, filters, kernel, stride, f"{prefix}_conv{index}", f"{prefix}_bn{index}",
                     gamma_zero=last)
        if not last:
            y = keras.layers.ReLU(name=f"{prefix}_relu{index}")(y)
    x = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{prefix}_relu")(x)


def build_resnet(arch: str | ResNetArch, num_classes: int, input_shape=None,
                 name: str | None = None) -> keras.Model:
    """A ResNet of the reference as a functional Keras model; outputs logits."""
    arch = get_arch(arch) if isinstance(arch, str) else arch
    input_shape = tuple(int(d) for d in (input_shape or arch.default_input_shape))
    inputs = keras.Input(shape=input_shape, name="images")
    kernel, stride = (7, 2) if arch.imagenet_stem else (3, 1)
    x = _conv_bn(inputs, arch.widths[0], kernel, stride, "conv", "bn")
    x = keras.layers.ReLU(name="relu")(x)
    if arch.imagenet_stem:
        x = keras.layers.MaxPooling2D(3, 2, padding="same", name="max_pool")(x)
    in_channels = arch.widths[0]
    for stage, (n_blocks, width, stride) in enumerate(zip(arch.blocks, arch.widths,
                                                         arch.strides)):
        for b in range(n_blocks):
            x = _block(x, width, stride if b == 0 else 1, in_channels, arch.bottleneck,
                       f"block{stage}_{b}")
            in_channels = width * arch.expansion
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = keras.layers.Dense(
        num_classes, name="fc",
        kernel_initializer=keras.initializers.RandomNormal(stddev=1e-2))(x)
    return keras.Model(inputs, logits, name=name or arch.name)


def build_model(arch: str, num_classes: int, input_shape=None) -> keras.Model:
    """A built-in ResNet by name ('resnet8'...'resnet110', 'resnet18'/'34'/'50')."""
    return build_resnet(arch, num_classes, input_shape)
