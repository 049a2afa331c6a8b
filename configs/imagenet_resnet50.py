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
    # Fine-tuning: T = 10 as the reference for ImageNet; the reference does not publish
    # its ImageNet fine-tuning schedule, these are the usual ResNet-50 settings.
    config.finetune.mode = "ekg"
    config.finetune.temperature = 10.0
    config.finetune.batch_size = 256
    config.finetune.epochs = 90
    config.finetune.learning_rate = 0.1
    config.finetune.weight_decay = 1e-4
    config.finetune.schedule = "cosine"
    config.finetune.bn_recalibration_images = 1024  # 224x224 float32: 0.6 GB
    return config
