"""Default configuration (ml_collections), one function per section.

Experiment files in `configs/` start from `base_config()` and override; every
key can be overridden from the command line (`--config.train.epochs=3`).
"""
from __future__ import annotations

import ml_collections


def model_config():
    return ml_collections.ConfigDict(dict(
        arch="resnet56",        # built-in: resnet8/20/32/56/110 (CIFAR), resnet18/34/50 (ImageNet)
        # The model: weights of model.arch (.npz/.pkl reference, .weights.h5, checkpoint), or a
        # whole model: "path/model.keras" (safe mode) or "keras.applications.<Name>".
        init="",
        init_weights="",        # keras.applications weights: "" (random), "imagenet", a .weights.h5
        # > 0: the momentum of every BatchNormalization (0 keeps the model's own; e.g.
        # keras.applications use 0.999, whose moving averages lag a short training run)
        bn_momentum=0.0,
        sync_bn=True,           # all-reduce BN batch statistics over replicas
    ))


def data_config():
    return ml_collections.ConfigDict(dict(
        source="npz",           # npz | tfds | folder | digits | synthetic
        name="cifar10",         # cifar10 | cifar100 | imagenet2012 | digits | synthetic
        num_classes=0,          # 0: from the dataset name
        # "": the dataset's normalisation (a keras.applications model: its own preprocessing);
        # or cifar10 | cifar100 | imagenet | none | keras.applications.<Name>
        normalization="",
        train_path="",
        test_path="",
        tfds_data_dir="",
        tfds_manual_dir="",     # imagenet2012: folder with the ILSVRC tars
        image_size=32,
        batch_size=128,         # global batch size
        eval_batch_size=256,
        shuffle_buffer=10_000,
        random_flip=True,       # training augmentation: horizontal flips (off for digits)
        synthetic_train_size=2048,
        synthetic_test_size=512,
        val_per_class=32,       # search validation: last N images of each class (train split)
        adapt_per_class=256,    # adaptation pass: first N images of each class
    ))


def train_config():
    return ml_collections.ConfigDict(dict(
        epochs=100,
        steps=0,                # >0: stop after this many steps (overrides epochs)
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,      # L2 added to the gradients, as the reference
        schedule="step",        # step | cosine | constant
        decay_boundaries=(0.3, 0.6, 0.8),   # fractions of training
        decay_factor=0.2,
        warmup_steps=0,
        checkpoint_every_steps=500,
        keep_checkpoints=3,
        eval_every_epochs=1,
        log_every_steps=50,
        seed=0,
        jit_compile="auto",     # auto (on for GPU, off for CPU) | true | false
        precision="float32",    # float32 | mixed_bfloat16 | mixed_float16 (f32 master weights)
    ))


def search_config():
    return ml_collections.ConfigDict(dict(
        # stop when metric(sub-network)/metric(full) <= target_ratio, in (0, 1); the metric is
        # target_metric: macs (multiply-adds) | latency (predicted on search.runtime, batch
        # search.latency_batch, from block latencies timed on this machine: ekg_tf.latency)
        target_ratio=0.45,
        target_metric="macs",
        target_ms=0.0,          # > 0 (target_metric=latency): stop at this predicted latency (ms)
        runtime="tflite",       # latency target's runtime: tflite (XNNPACK) | onnxruntime
        runtime_threads=2,      # its threads
        latency_batch=1,        # its batch size
        latency_cache="",       # block-latency tables ("": $XDG_CACHE_HOME/ekg_tf/latency)
        latency_max_cells=256,  # width combinations timed per distinct block at most
        search_step=0.2,        # coarse step per gate: max(1/C, search_step/uses)
        # kept widths: multiples of round_to (or a group's full width); 8 or 16 match the
        # channel blocks of XNNPACK / onnxruntime kernels (pruned models as fast as their
        # MACs say); 1: any width (the reference)
        round_to=1,
        batch_size=256,         # validation batch (BN batch statistics are per batch)
        objective="ekg",        # ekg (CE + CE(softmax(K))) | loss (plain CE) | accuracy
        importance="taylor",    # taylor (through the gates) | l1 (filter L1 norms)
        adapt=True,             # the reference's short adaptation pass before searching
        adapt_learning_rate=1e-3,
        adapt_batch_size=256,
        adapt_weight_decay=5e-4,
        cache_prefix=True,      # cache the unchanged prefix of the network per candidate
        forward="sliced",       # sliced (sub-networks at their real width) | masked (full width)
        num_teachers=5,
        build_memory_bank=True,
        memory_bank_topk=0,     # 0: full logits; k>0: top-k logits per teacher (ImageNet)
        memory_bank_shard_size=10_000,
        memory_bank_precision="float32",  # the teachers' compute dtype: float32 |
                                          # mixed_bfloat16 | mixed_float16 (train.precision)
        bn_recalibration_images=4096,   # training images for the BN re-estimation (test eval)
        max_steps=1000,         # stop after this many steps in all (resume with a larger one)
    ))


def finetune_config():
    return ml_collections.ConfigDict(dict(
        mode="ekg",             # ekg | plain (CE, one view) | kd (unpruned network as the only teacher)
        temperature=0.0,        # 0: 4 for CIFAR, 10 for 1000+ classes (ImageNet)
        teacher_selection="global",  # global (sums all-reduced: N replicas == 1 device) | replica
        views=2,                # augmented views per image (ekg/kd); gradients averaged over views
        jitter=True,            # colour jitter on the distillation views (spec section 8)
        epochs=100,
        steps=0,                # >0: train this many steps (overrides epochs)
        batch_size=0,           # global batch; 0: data.batch_size
        learning_rate=1e-2,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,      # L2 added to the gradients, as the reference
        schedule="step",        # step | cosine | constant
        decay_boundaries=(0.3, 0.6, 0.8),   # fractions of the fine-tuning
        decay_factor=0.2,
        warmup_steps=0,
        train_subset=0,         # >0: use only this many (random, seeded) training images
        bn_recalibration_images=4096,  # training images re-estimating BN before training
    ))


def qat_config():
    """Quantization-aware training (ekg-qat); the keys not here (momentum, weight decay,
    views, jitter, temperature, teacher selection) are the fine-tuning's."""
    return ml_collections.ConfigDict(dict(
        # auto (ekg when workdir/memory_bank exists, else plain) | ekg (EKG distillation
        # from the memory bank) | float (distillation from the float network itself) | plain
        mode="auto",
        epochs=1,
        steps=0,                # >0: train this many steps (overrides epochs)
        batch_size=0,           # global batch; 0: data.batch_size
        learning_rate=1e-3,
        schedule="cosine",      # cosine | step (finetune.decay_*) | constant
        warmup_steps=0,
        train_subset=0,         # >0: use only this many (random, seeded) training images
        # Training batches that set the activation ranges before QAT (their mean batch
        # [min, max]); 0: tfmot's own start, [-6, 6] moved by a 0.999 moving average
        calibration_batches=8,
        # How those batches set the ranges: mse (the fraction of the observed [min, max]
        # with the least int8 round-trip error, as post-training int8; the ranges then stay
        # fixed through QAT) | minmax (the mean batch [min, max], then tfmot's moving
        # average). mse: int8 logit RMS error 0.108 vs 0.124 on the pruned ResNet-56
        # before any training
        range_calibration="mse",
        # BN keeps the float network's moving statistics (inference mode) during QAT: a
        # short run from a converged network otherwise replaces them with those of a few
        # augmented batches, which moved 12.5% of the pruned ResNet-56's test predictions
        freeze_bn=True,
        # Distillation temperature of the QAT loss (modes float and ekg); 0: the
        # fine-tuning's (finetune.temperature)
        temperature=0.0,
    ))


def export_config():
    return ml_collections.ConfigDict(dict(
        formats="saved_model,tflite,onnx",        # saved_model | tflite | onnx
        quantize="none,float16,dynamic,int8",     # TFLite modes (none = float32)
        model_name="ekg_model",  # TF Serving model name: <export_dir>/saved_model/<name>/<version>
        version=0,              # 0: next free version number; an existing one is never overwritten
        input_contract="images",  # images (float, normalised) | images_uint8 | image_bytes
        fold_batch_norm=True,   # fold BN into the convs of the deployed graphs (parity-checked)
        opset=17,               # ONNX opset
        representative_images=256,  # training images calibrating full-int8 TFLite
        representative_path="",  # "": the training split; else an .npz with uint8 'x'
        int8_io=False,          # full-int8 TFLite with int8 input/output tensors
        int8_calibration="mse",  # activation ranges: mse (least round-trip error) | minmax
        verify_images=1000,     # test-split images for diffs/accuracy (first N)
        latency_runs=20,        # timed runs per measurement (median reported)
        threads=2,              # TFLite / onnxruntime threads
        dense_latency=True,     # also time the unpruned network (pruned/dense ratio)
    ))


# Batch sizes that must be positive (finetune.batch_size may be 0: data.batch_size).
POSITIVE_KEYS = ("data.batch_size", "data.eval_batch_size", "search.batch_size",
                 "search.adapt_batch_size")
NON_NEGATIVE_KEYS = ("finetune.batch_size",)


def check(config):
    """Refuses values no stage can run with (a UserError naming the key)."""
    from ekg_tf.errors import UserError
    for keys, ok, what in ((POSITIVE_KEYS, lambda v: v > 0, "> 0"),
                           (NON_NEGATIVE_KEYS, lambda v: v >= 0, ">= 0 (0: data.batch_size)")):
        for key in keys:
            section, name = key.split(".")
            if section in config and name in config[section]:
                value = config[section][name]
                if not isinstance(value, int) or not ok(value):
                    raise UserError(f"{key} must be an integer {what}, got {value!r}")


# `model.init` / `data.normalization` naming a keras.applications model. Here, not in
# ekg_tf.data, so that resolving a config (and refusing a bad one) imports no TensorFlow.
APPLICATIONS_PREFIX = "keras.applications."


def resolve(config):
    """Checks `config` and fills derived defaults in place: a keras.applications model's
    inputs are normalised with its own preprocessing unless data.normalization says
    otherwise."""
    check(config)
    init = str(config.model.get("init", "") or "")
    if not config.data.get("normalization") and init.startswith(APPLICATIONS_PREFIX):
        config.data.normalization = init
    return config


def base_config():
    config = ml_collections.ConfigDict()
    config.model = model_config()
    config.data = data_config()
    config.train = train_config()
    config.search = search_config()
    config.finetune = finetune_config()
    config.qat = qat_config()
    config.export = export_config()
    config.strategy = "mirrored"    # mirrored | one_device | multi_worker (auto when TF_CONFIG)
    config.seed = 0
    return config


def reference_cifar_config(arch: str, dataset: str):
    """A CIFAR experiment with the reference's settings (the configs/cifar*.py files)."""
    config = base_config()
    config.model.arch = arch
    config.data.source = "npz"
    config.data.name = dataset
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
