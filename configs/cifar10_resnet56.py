"""ResNet-56 on CIFAR-10 with the reference's settings."""
from ekg_tf.config import base_config


def get_config():
    config = base_config()
    config.model.arch = "resnet56"
    config.data.source = "npz"
    config.data.name = "cifar10"
    config.data.batch_size = 128
    config.train.epochs = 200
    config.train.learning_rate = 0.1
    config.train.decay_boundaries = (0.5, 0.75)
    config.train.decay_factor = 0.1
    config.search.target_ratio = 0.45
    # Fine-tuning (the reference's CIFAR settings, spec section 7).
    config.finetune.mode = "ekg"
    config.finetune.temperature = 4.0
    config.finetune.batch_size = 128
    config.finetune.epochs = 100
    config.finetune.learning_rate = 1e-2
    config.finetune.momentum = 0.9
    config.finetune.nesterov = True
    config.finetune.weight_decay = 5e-4
    config.finetune.schedule = "step"
    config.finetune.decay_boundaries = (0.3, 0.6, 0.8)
    config.finetune.decay_factor = 0.2
    return config
