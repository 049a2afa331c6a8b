"""Gated ResNets and their pruning objects."""
from ekg_tf.models.gates import Gate, GateGroup, kept_count
from ekg_tf.models.layers import BatchNorm, GatedConv2D, GatedDense
from ekg_tf.models.resnet import ARCHS, GatedResNet, ResNetArch, build_model, get_arch
