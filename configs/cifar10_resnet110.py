"""ResNet-110 on CIFAR-10 with the reference's settings."""
from ekg_tf.config import reference_cifar_config


def get_config():
    return reference_cifar_config("resnet110", "cifar10")
