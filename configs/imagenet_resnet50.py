"""ResNet-50 on ImageNet (ILSVRC-2012 through TFDS with a manual dir)."""
from ekg_tf.config import base_config


def get_config():
    config = base_config()
    config.model.arch = "resnet50"
    config.data.source = "tfds"
    config.data.name = "imagenet2012"
    config.data.image_size = 224
    config.data.batch_size = 256
    config.data.eval_batch_size = 256
    config.data.val_per_class = 10
    config.data.adapt_per_class = 10
    config.train.epochs = 90
    config.train.learning_rate = 0.1
    config.train.weight_decay = 1e-4
    config.train.schedule = "cosine"
    config.search.target_ratio = 0.55
    config.search.memory_bank_topk = 20
    config.finetune.epochs = 90
    config.finetune.learning_rate = 0.1
    config.finetune.temperature = 10.0
    return config
