"""Quickstart: ResNet-20 on scikit-learn's handwritten digits (1,797 real 8x8 scans that ship
inside scikit-learn: offline), the whole method in minutes on a CPU.

    ekg-prune --config=configs/quickstart.py --workdir=runs/quickstart

Trains the dense network (digits resized to 32x32, no flips), searches a sub-network with
about half its MACs, builds the memory bank, fine-tunes with ensemble knowledge and
exports SavedModel, TFLite (float32/float16/dynamic/int8) and ONNX, each verified.
"""
from ekg_tf.config import base_config


def get_config():
    config = base_config()
    config.model.arch = "resnet20"
    config.data.source = "digits"
    config.data.name = "digits"
    config.data.image_size = 32
    config.data.random_flip = False     # a mirrored digit is another glyph
    config.data.batch_size = 64
    config.data.eval_batch_size = 256
    config.data.val_per_class = 16      # search validation: the last 16 per class (160)
    config.data.adapt_per_class = 32    # adaptation pass: the first 32 per class (320)
    config.train.epochs = 12
    config.train.learning_rate = 0.1
    config.train.schedule = "cosine"
    config.train.checkpoint_every_steps = 100
    config.train.log_every_steps = 20
    config.search.target_ratio = 0.5
    config.search.batch_size = 160
    config.search.adapt_batch_size = 64
    config.search.bn_recalibration_images = 1024
    config.finetune.temperature = 4.0
    config.finetune.batch_size = 64
    config.finetune.epochs = 8
    config.finetune.learning_rate = 1e-2
    config.finetune.bn_recalibration_images = 1024
    config.export.latency_runs = 10
    return config
