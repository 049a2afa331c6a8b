"""ResNet-56 on CIFAR-100 with the reference's settings."""
from ekg_tf.config import reference_cifar_config


def get_config():
    return reference_cifar_config("resnet56", "cifar100")
