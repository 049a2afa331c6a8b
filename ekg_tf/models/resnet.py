"""Gated ResNets built as the EKG reference builds them.

CIFAR ResNet-20/32/56/110 (3x3 stem, stages 16/32/64) and ImageNet
ResNet-18/34/50 (7x7/2 stem + 3x3/2 max-pool, stages 64..512). Projection
shortcuts (1x1 conv + BN) where stride or width changes, the last BN of each
block starts at gamma = 0, BN epsilon 1e-5 and momentum 0.9. Layer names follow
the reference (`conv`, `bn`, `block{stage}_{block}/conv1`, ..., `fc`) so its
variable `BasicBlock{s}.{b}/conv1/kernel:0` is our `block{s}_{b}/conv1/kernel`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import keras

from ekg_tf.models.gates import Gate, GateGroup
from ekg_tf.models.layers import BatchNorm, GatedConv2D, GatedDense


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


_CIFAR = dict(widths=(16, 32, 64), strides=(1, 2, 2), bottleneck=False, imagenet_stem=False)
_IMAGENET = dict(widths=(64, 128, 256, 512), strides=(1, 2, 2, 2), imagenet_stem=True)

ARCHS = {
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
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHS)}") from None


# The dataflow of a gated ResNet, written once. The model's own forward, the search's
# masked forward (which records gate outputs and BN moments) and its sliced
# real-width forward differ only in how a conv + BN pair is applied and what a gate
# does, so they pass those two steps in:
#   conv_bn(conv, bn, x) -> bn(conv(x));  gate(gate_layer, x) -> x gated (or recorded).
def stem_forward(model, x, conv_bn, gate):
    """Stem conv + BN + ReLU (+ max-pool for ImageNet), then the first stream gate."""
    x = tf.nn.relu(conv_bn(model.stem_conv, model.stem_bn, x))
    if model.arch.imagenet_stem:
        x = tf.nn.max_pool2d(x, 3, 2, "SAME")
    return gate(model.stem_gate, x)


def block_forward(block, x, conv_bn, gate):
    """One residual block: convs with gated inner ReLUs, shortcut, add, ReLU, stream gate."""
    shortcut = x
    if block.projection is not None:
        shortcut = conv_bn(block.projection, block.projection_bn, x)
    gates = block.gates
    for i, (conv, bn) in enumerate(zip(block.convs, block.bns)):
        x = conv_bn(conv, bn, x)
        if i < len(gates):
            x = gate(gates[i], tf.nn.relu(x))
    return gate(block.stream_gate, tf.nn.relu(x + shortcut))


def segment_forward(model, s: int, x, conv_bn, gate):
    """Segment `s` of the network: 0 is the stem, s > 0 is block s-1."""
    if s == 0:
        return stem_forward(model, x, conv_bn, gate)
    return block_forward(model.blocks[s - 1], x, conv_bn, gate)


def _apply_gate(gate, x):
    return gate(x)


class ResidualBlock(keras.layers.Layer):
    """Basic (two 3x3) or bottleneck (1x1-3x3-1x1) block with gates after inner ReLUs.

    The block's output (after add + ReLU) goes through the stage's stream gate.
    """

    def __init__(self, width, strides, in_channels, bottleneck, in_group, stream_group,
                 sync_bn=True, **kwargs):
        super().__init__(**kwargs)
        out_channels = width * (4 if bottleneck else 1)
        self.bottleneck = bottleneck
        self.inner_groups = []
        conv_specs = []  # (conv name, kernel, strides, filters)
        if bottleneck:
            conv_specs = [("conv0", 1, 1, width), ("conv1", 3, strides, width),
                          ("conv2", 1, 1, out_channels)]
        else:
            conv_specs = [("conv1", 3, strides, width), ("conv2", 3, 1, out_channels)]
        # Sub-layers are attributes, not lists: tf.train.Checkpoint does not see into
        # Keras 3's tracked lists, and checkpoints must hold every variable.
        self._conv_names, self._bn_names, self._gate_names = [], [], []
        group_in = in_group
        for i, (conv_name, k, s, filters) in enumerate(conv_specs):
            last = i == len(conv_specs) - 1
            if last:
                group_out = stream_group
            else:
                group_out = GateGroup(f"{self.name}/gate{conv_name[-1]}", filters)
                self.inner_groups.append(group_out)
            index = conv_name[-1]
            setattr(self, conv_name, GatedConv2D(filters, k, s, in_group=group_in,
                                                 out_group=group_out, name=conv_name))
            setattr(self, f"bn{index}", BatchNorm(gamma_zero=last, synchronized=sync_bn,
                                                  name=f"bn{index}"))
            self._conv_names.append(conv_name)
            self._bn_names.append(f"bn{index}")
            if not last:
                setattr(self, f"gate{index}", Gate(group_out, name=f"gate{index}"))
                self._gate_names.append(f"gate{index}")
            group_in = group_out
        self.projection = None
        if strides > 1 or in_channels != out_channels:
            self.projection = GatedConv2D(out_channels, 1, strides, in_group=in_group,
                                          out_group=stream_group, name="conv3")
            self.projection_bn = BatchNorm(synchronized=sync_bn, name="bn3")
        self.stream_gate = Gate(stream_group, name="stream_gate")

    @property
    def convs(self) -> list[GatedConv2D]:
        return [getattr(self, n) for n in self._conv_names]

    @property
    def bns(self) -> list[BatchNorm]:
        return [getattr(self, n) for n in self._bn_names]

    @property
    def gates(self) -> list[Gate]:
        return [getattr(self, n) for n in self._gate_names]

    def call(self, x, training=False, freeze_bn_stats=False):
        def conv_bn(conv, bn, z):
            return bn(conv(z), training=training, freeze_stats=freeze_bn_stats)
        return block_forward(self, x, conv_bn, _apply_gate)


class GatedResNet(keras.Model):
    """A ResNet whose prunable channels are governed by explicit `GateGroup`s.

    `call(images, training=False, freeze_bn_stats=False)`; images are already
    normalised NHWC float32. With every rate at 1.0 it is the dense network.
    """

    def __init__(self, arch: str | ResNetArch, num_classes: int, input_shape=None,
                 sync_bn: bool = True, **kwargs):
        arch = get_arch(arch) if isinstance(arch, str) else arch
        super().__init__(name=kwargs.pop("name", arch.name), **kwargs)
        self.arch = arch
        self.num_classes = int(num_classes)
        if input_shape is None:
            input_shape = (224, 224, 3) if arch.imagenet_stem else (32, 32, 3)
        self.image_shape = tuple(int(d) for d in input_shape)
        widths = arch.widths
        self.stream_groups = [GateGroup(f"stream{s}", widths[s] * arch.expansion)
                              for s in range(len(widths))]
        # The stem output is stage 0's residual stream for basic blocks; a
        # bottleneck's first block widens it through a projection, so the stem
        # then has a group of its own.
        stem_group = GateGroup("stem", widths[0]) if arch.bottleneck else self.stream_groups[0]
        self.stem_group = stem_group
        k, s = (7, 2) if arch.imagenet_stem else (3, 1)
        self.stem_conv = GatedConv2D(widths[0], k, s, in_group=None, out_group=stem_group,
                                     name="conv")
        self.stem_bn = BatchNorm(synchronized=sync_bn, name="bn")
        self.stem_gate = Gate(stem_group, name="stem_gate")
        self._block_names = []
        in_channels, in_group = widths[0], stem_group
        for stage, (n_blocks, width, stride) in enumerate(zip(arch.blocks, widths, arch.strides)):
            for b in range(n_blocks):
                block = ResidualBlock(width, stride if b == 0 else 1, in_channels,
                                      arch.bottleneck, in_group, self.stream_groups[stage],
                                      sync_bn=sync_bn, name=f"block{stage}_{b}")
                setattr(self, block.name, block)  # an attribute: see ResidualBlock
                self._block_names.append(block.name)
                in_channels, in_group = width * arch.expansion, self.stream_groups[stage]
        self.fc = GatedDense(num_classes, in_group=in_group, name="fc")
        self(tf.zeros((1, *self.image_shape)))  # create weights, record spatial sizes

    @property
    def blocks(self) -> list[ResidualBlock]:
        return [getattr(self, n) for n in self._block_names]

    @property
    def gate_groups(self) -> list[GateGroup]:
        """Every gate group, in network order (stem/stream groups, then block groups)."""
        groups = [self.stem_group] if self.arch.bottleneck else []
        groups += list(self.stream_groups)
        for block in self.blocks:
            groups += block.inner_groups
        return groups

    def gate_group(self, name: str) -> GateGroup:
        for group in self.gate_groups:
            if group.name == name:
                return group
        raise KeyError(f"no gate group {name!r}; groups: {[g.name for g in self.gate_groups]}")

    @property
    def gates(self) -> list[Gate]:
        return [gate for group in self.gate_groups for gate in group.gates]

    def call(self, images, training=False, freeze_bn_stats=False):
        def conv_bn(conv, bn, z):
            return bn(conv(z), training=training, freeze_stats=freeze_bn_stats)
        x = stem_forward(self, images, conv_bn, _apply_gate)
        for block in self.blocks:
            x = block(x, training=training, freeze_bn_stats=freeze_bn_stats)
        return self.fc(tf.reduce_mean(x, axis=[1, 2]))

    def conv_layers(self) -> list[GatedConv2D]:
        convs = [self.stem_conv]
        for block in self.blocks:
            convs += block.convs
            if block.projection is not None:
                convs.append(block.projection)
        return convs

    def batch_norms(self) -> list[tuple[BatchNorm, GatedConv2D]]:
        """(batch norm, the conv that feeds it)."""
        pairs = [(self.stem_bn, self.stem_conv)]
        for block in self.blocks:
            pairs += list(zip(block.bns, block.convs))
            if block.projection is not None:
                pairs.append((block.projection_bn, block.projection))
        return pairs


def build_model(arch: str, num_classes: int, input_shape=None, sync_bn: bool = True) -> GatedResNet:
    """Builds a gated ResNet by name ('resnet20'...'resnet110', 'resnet18'/'34'/'50')."""
    return GatedResNet(arch, num_classes, input_shape=input_shape, sync_bn=sync_bn)
