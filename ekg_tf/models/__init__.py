"""Built-in model architectures (plain Keras models; their channel groups are traced)."""
from ekg_tf.models.resnet import ARCHS, ResNetArch, build_model, build_resnet, get_arch

__all__ = ["ARCHS", "ResNetArch", "build_model", "build_resnet", "get_arch"]
