"""ResNet-8 on synthetic (generated, not real) images: the unit tests' small config (offline, seconds)."""
from ekg_tf.config import base_config


def get_config():
    config = base_config()
    config.model.arch = "resnet8"
    config.data.source = "synthetic"
    config.data.name = "synthetic"
    config.data.batch_size = 64
    config.data.eval_batch_size = 128
    config.data.synthetic_train_size = 1024
    config.data.synthetic_test_size = 256
    config.data.val_per_class = 16
    config.data.adapt_per_class = 32
    config.train.epochs = 2
    config.train.learning_rate = 0.05
    config.train.schedule = "cosine"
    config.train.checkpoint_every_steps = 8
    config.search.target_ratio = 0.6
    config.search.batch_size = 160
    config.finetune.epochs = 1
    return config
