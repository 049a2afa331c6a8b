"""keras.applications MobileNetV2 (random init, trained here) on CIFAR-10 at 32x32.

Its inputs use MobileNetV2's own preprocessing (x / 127.5 - 1). Train it first, then
prune it like any model:

    ekg-train --config=configs/cifar10_mobilenetv2.py --workdir=runs/mbv2 \
      --config.data.train_path=... --config.data.test_path=...
    ekg-search --config=configs/cifar10_mobilenetv2.py --workdir=runs/mbv2 \
      --config.model.init_weights=runs/mbv2/model.weights.h5 ...
"""
from ekg_tf.config import reference_cifar_config


def get_config():
    config = reference_cifar_config("resnet56", "cifar10")  # CIFAR data and EKG recipe
    config.model.init = "keras.applications.MobileNetV2"
    config.model.bn_momentum = 0.9  # Keras' 0.999 lags a 20-epoch run: test top-1 at chance
    config.train.epochs = 20
    config.train.learning_rate = 0.05
    config.train.schedule = "cosine"
    config.train.weight_decay = 4e-5
    config.search.target_ratio = 0.5
    config.finetune.epochs = 2
    config.finetune.weight_decay = 4e-5
    return config
