"""The `ekg-finetune` job: slim the searched sub-network, then fine-tune it.

`run_finetune(config, workdir)`:
1. reads `workdir/search/subnet.json` and the search's (adapted) weights
   `workdir/search/weights.weights.h5` (else `config.model.init`), and builds the
   physically slimmed plain Keras model (`ekg_tf.slimming.slim_model`);
2. re-estimates its BN statistics on training images and evaluates it on the
   test split: `top1_before` (epoch 0);
3. trains it with `ekg_tf.train.Trainer`/`fit` (resumable, best + last
   checkpoints, TensorBoard, progress bar, test evaluation every epoch) with the
   loss of `finetune.mode`:
   - `ekg`: ensemble-knowledge distillation (section 7) from `workdir/memory_bank/`:
     two jittered views, gradients averaged over the views (`grad_scale=1/2`);
   - `kd`: the same loss with the unpruned network as the only teacher (always
     selected): its column of the memory bank when the bank holds the unpruned
     network (search history step 0), else its training-set logits computed once,
     with the bank's own writer and protocol (no augmentation, BN batch
     statistics), into `workdir/finetune/kd_teacher/`;
   - `plain`: cross-entropy on one view (the ablation).
   Teacher logits are looked up by the example index that the input pipeline
   yields with each image, after shuffling and sharding, so they stay paired.
4. writes `workdir/finetune/`: `best.keras`, `last.keras` (plain Keras models),
   `result.json`, `accuracy_per_epoch.png`, `checkpoints/`, `tensorboard/`.

Under several replicas the slim model's BN layers are synchronised
(`model.sync_bn`) and the teacher selection uses the global batch
(`finetune.teacher_selection = global`), so N replicas train like one device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys

import numpy as np
import tensorflow as tf
import keras

from ekg_tf import data, flops, train
from ekg_tf.config import resolve
from ekg_tf.data.pipeline import steps_per_epoch as count_steps
from ekg_tf.distribute import make_strategy, use_jit
from ekg_tf.finetune.distill import SELECTIONS, make_distillation_loss
from ekg_tf.train.precision import check_precision, wrap_optimizer
from ekg_tf.subnet_search.memory_bank import MemoryBank, build_memory_bank
from ekg_tf.slimming import recalibrate_batch_norm, slim_model
from ekg_tf.subnet import SubnetSpec
from ekg_tf.utils.cli import UserError
from ekg_tf.utils.context import attribute_set
from ekg_tf.utils.io import atomic_path, atomic_write_json
from ekg_tf.utils.plots import save_line_plot
from ekg_tf.utils.progress import ProgressBar

MODES = ("ekg", "kd", "plain")


# ------------------------------------------------------------------------------ settings
def resolve_temperature(config) -> float:
    """finetune.temperature, or 4 (CIFAR-sized label sets) / 10 (1000+ classes) when 0."""
    t = float(config.finetune.get("temperature", 0.0) or 0.0)
    if t < 0:
        raise UserError(f"finetune.temperature must be >= 0 (0 = auto), got {t}")
    if t > 0:
        return t
    return 10.0 if data.num_classes_for(config.data) >= 1000 else 4.0


def optimizer_config(config):
    """config.train with the fine-tuning's optimizer/schedule keys (for make_optimizer)."""
    ft = config.finetune
    tcfg = config.train.copy_and_resolve_references()
    with tcfg.unlocked():
        for key in ("learning_rate", "momentum", "nesterov", "schedule", "decay_boundaries",
                    "decay_factor", "warmup_steps", "weight_decay"):
            tcfg[key] = ft[key]
    return tcfg


def check_settings(config):
    ft = config.finetune
    if ft.mode not in MODES:
        raise UserError(f"unknown finetune.mode {ft.mode!r}; choose one of {MODES}")
    if ft.teacher_selection not in SELECTIONS:
        raise UserError(f"unknown finetune.teacher_selection {ft.teacher_selection!r}; "
                        f"choose one of {SELECTIONS}")
    check_precision(config.train.precision)
    if int(ft.views) < 1:
        raise UserError(f"finetune.views must be >= 1, got {ft.views}")
    if int(ft.epochs) < 1 and int(ft.steps) < 1:
        raise UserError("set finetune.epochs or finetune.steps to at least 1")


# ------------------------------------------------------------------------------ the network
def search_paths(workdir: str) -> dict:
    return {"spec": os.path.join(workdir, "search", "subnet.json"),
            "weights": os.path.join(workdir, "search", "weights.weights.h5"),
            "bank": os.path.join(workdir, "memory_bank")}


def load_gated(config, workdir: str):
    """(gated clone with the search's weights, SubnetSpec, weights source)."""
    from ekg_tf.graph.gated import GatedModel
    from ekg_tf.models.sources import model_from_config, model_kind
    from ekg_tf.weights import load_weights

    paths = search_paths(workdir)
    if not os.path.exists(paths["spec"]):
        raise UserError(f"no sub-network found: {paths['spec']} does not exist. Run ekg-search "
                        f"first (ekg-search --config=... --workdir={workdir}), which writes it.")
    spec = SubnetSpec.from_json(paths["spec"])
    model = GatedModel(model_from_config(config, load_init=False),
                       sync_bn=bool(config.model.sync_bn))
    try:
        spec.check_fits(model)
    except ValueError as e:
        raise UserError(f"{paths['spec']} does not fit the configured model: {e}") from None
    init = str(config.model.init or "")
    if os.path.exists(paths["weights"]):
        source = paths["weights"]  # the search's adapted weights: what the spec/teachers saw
        load_weights(model, source)
    elif init and model_kind(init) == "builtin":
        source = init
        load_weights(model, source)
    elif init:
        source = init  # a .keras file or an application carries its weights
    else:
        raise UserError(f"no weights for the sub-network: neither {paths['weights']} nor "
                        "model.init exists; run ekg-search or set --config.model.init")
    spec.apply_to(model)
    return model, spec, source


def build_slim(gated, spec, strategy, sync_bn: bool):
    with strategy.scope():
        model = slim_model(gated, spec, name=f"{gated.arch_name}_slim")
    train.synchronize_batch_norm(model, strategy, sync_bn)
    return model


@contextlib.contextmanager
def plain_batch_norm(model):
    """Saved models carry standard (unsynchronised) BN layers."""
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    with attribute_set(bns, "synchronized", False):
        yield model


def save_keras(model, path: str):
    with plain_batch_norm(model), atomic_path(path) as tmp:
        model.save(tmp)


# ------------------------------------------------------------------------------ teachers
class TeacherColumns:
    """A view of some teacher columns of a memory bank (kd: the unpruned network only)."""

    def __init__(self, bank: MemoryBank, columns):
        self.bank, self.columns = bank, list(columns)
        self.num_examples, self.num_classes = bank.num_examples, bank.num_classes
        self.num_teachers = len(self.columns)

    def lookup(self, indices):
        return self.bank.lookup(indices)[:, :, self.columns]

    def tf_lookup(self, indices):
        return tf.gather(self.bank.tf_lookup(indices), self.columns, axis=2)


def open_bank(path: str, num_examples: int, num_classes: int, what: str) -> MemoryBank:
    bank = MemoryBank.open(path)
    if bank.num_examples != num_examples or bank.num_classes != num_classes:
        raise UserError(
            f"the {what} in {path} holds {bank.num_examples} examples x {bank.num_classes} "
            f"classes, but the training split has {num_examples} examples x {num_classes} "
            "classes: it was built for other data. Re-run ekg-search with this config "
            "(or point data.train_path at the split the bank was built from).")
    return bank


def unpruned_teacher(config, workdir, gated, spec, num_examples, train_arrays, log):
    """The unpruned network's training-set logits as a one-teacher bank (kd mode)."""
    bank_dir = search_paths(workdir)["bank"]
    classes = gated.num_classes
    if os.path.exists(os.path.join(bank_dir, "meta.json")):
        bank = open_bank(bank_dir, num_examples, classes, "memory bank")
        steps = [int(t["step"]) for t in bank.meta.get("teachers", [])]
        if 0 in steps:  # history step 0 is the unpruned network
            log(f"kd: the unpruned network is memory-bank teacher {steps.index(0)}")
            return TeacherColumns(bank, [steps.index(0)])
    kd_dir = os.path.join(workdir, "finetune", "kd_teacher")
    if os.path.exists(os.path.join(kd_dir, "meta.json")):
        return open_bank(kd_dir, num_examples, classes, "unpruned-network logits")
    log(f"kd: computing the unpruned network's logits on {num_examples} training images "
        f"into {kd_dir}")
    entry = {"step": 0, "loss": float("nan"), "macs_ratio": 1.0,
             "rates": {name: 1.0 for name in spec.groups},
             "ranks": {name: list(g.rank) for name, g in spec.groups.items()}}
    bs = int(config.data.eval_batch_size)
    dataset_fn, n = data.input_fn(config.data, "train", training=False, global_batch_size=bs,
                                  with_index=True, shuffle=False, drop_remainder=False,
                                  arrays=train_arrays)
    bar = ProgressBar(-(-n // bs), desc="unpruned logits", unit="img")
    batches = ((x.numpy(), y.numpy(), i.numpy()) for x, y, i in dataset_fn(None))
    try:
        build_memory_bank(gated, [entry], batches, n, kd_dir,
                          shard_size=int(config.search.memory_bank_shard_size),
                          topk=int(config.search.memory_bank_topk or 0),
                          temperature=resolve_temperature(config), progress=bar,
                          precision=config.search.memory_bank_precision,
                          extra_meta={"split": "train", "data": config.data.name,
                                      "what": "unpruned network (finetune.mode=kd)"})
    finally:
        spec.apply_to(gated)  # the writer changed the masks
        bar.close()
    return MemoryBank.open(kd_dir)


def check_bank(bank_dir: str, num_examples: int, num_classes: int) -> MemoryBank:
    """The EKG memory bank, checked against the training split."""
    if not os.path.exists(os.path.join(bank_dir, "meta.json")):
        raise UserError(f"finetune.mode=ekg needs the memory bank {bank_dir}/ (meta.json "
                        "missing): run ekg-search with search.build_memory_bank=True, or use "
                        "--config.finetune.mode=plain (or kd)")
    return open_bank(bank_dir, num_examples, num_classes, "memory bank")


def open_teachers(config, workdir, gated, spec, num_examples, train_arrays, log):
    mode = config.finetune.mode
    if mode == "plain":
        return None
    if mode == "kd":
        return unpruned_teacher(config, workdir, gated, spec, num_examples, train_arrays, log)
    return check_bank(search_paths(workdir)["bank"], num_examples, gated.num_classes)


# ------------------------------------------------------------------------------ data
def train_subset_indices(num_examples: int, subset: int, seed: int):
    """None (the whole split) or `subset` sorted random training indices."""
    if not subset or subset >= num_examples:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_examples, int(subset), replace=False))


def with_teachers(dataset_fn, teachers):
    """(images, labels, index) batches -> (images, labels, index, teacher logits [B,C,T])."""
    if teachers is None:
        return dataset_fn

    def fn(context=None):
        ds = dataset_fn(context)
        ds = ds.map(lambda x, y, i: (x, y, i, teachers.tf_lookup(i)),
                    num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    return fn


def train_input_fn(config, mode: str, teachers, global_batch_size: int, epochs: int,
                   start_epoch: int = 0, skip_batches: int = 0, arrays=None, indices=None):
    """Per-replica dataset function of the fine-tuning (views + jitter for distillation)."""
    views = 1 if mode == "plain" else int(config.finetune.views)
    fn, n = data.input_fn(config.data, "train", True, global_batch_size, views=views,
                          jitter=views > 1 and bool(config.finetune.jitter), with_index=True,
                          seed=int(config.seed), epochs=epochs, start_epoch=start_epoch,
                          skip_batches=skip_batches, arrays=arrays, indices=indices)
    return with_teachers(fn, teachers), n


def recalibration_images(config, count: int, arrays=None, indices=None) -> np.ndarray:
    """`count` normalised training images (no augmentation) for the BN re-estimation."""
    rng = np.random.default_rng(int(config.seed) + 11)
    if arrays is not None:
        pool = np.arange(len(arrays)) if indices is None else np.asarray(indices)
        pick = np.sort(rng.permutation(pool)[:count])
        fn, _ = data.input_fn(config.data, "train", False, 256, arrays=arrays, indices=pick)
    else:  # streaming: the first images of the split
        fn, _ = data.input_fn(config.data, "train", False, 256)
    out, have = [], 0
    for x, _ in fn(None):
        out.append(x.numpy())
        have += len(out[-1])
        if have >= count:
            break
    return np.concatenate(out)[:count]


# ------------------------------------------------------------------------------ the job
@dataclasses.dataclass
class Inputs:
    """The training data of a fine-tuning, checked against the workdir's search outputs."""
    train_arrays: object      # in-memory training split (None: streaming)
    test_arrays: object
    indices: object           # finetune.train_subset indices or None
    num_examples: int         # the whole training split (the memory bank's rows)


@dataclasses.dataclass
class Plan:
    batch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    num_images: int


def check_inputs(config, workdir) -> Inputs:
    """Cheap checks first: missing search outputs or a bank of other data fail in seconds."""
    ft, dcfg = config.finetune, config.data
    spec_path = search_paths(workdir)["spec"]
    if not os.path.exists(spec_path):
        raise UserError(f"no sub-network found: {spec_path} does not exist. Run ekg-search "
                        f"first (ekg-search --config=... --workdir={workdir}), which writes it.")
    streaming = dcfg.source == "tfds" and dcfg.name.startswith("imagenet")
    if ft.train_subset and streaming:
        raise UserError("finetune.train_subset needs an in-memory training split "
                        "(not the streaming ImageNet source)")
    train_arrays = None if streaming else data.load_arrays(dcfg, "train")
    _, n_split = data.input_fn(dcfg, "train", False, 1, arrays=train_arrays)
    if ft.mode == "ekg":
        check_bank(search_paths(workdir)["bank"], n_split, data.num_classes_for(dcfg))
    test_arrays = None if dcfg.source == "tfds" else data.load_arrays(dcfg, "test")
    indices = train_subset_indices(n_split, int(ft.train_subset), int(config.seed))
    return Inputs(train_arrays, test_arrays, indices, n_split)


def plan(config, inputs: Inputs, strategy) -> Plan:
    """Global batch, steps per epoch and in all (finetune.steps or finetune.epochs)."""
    ft = config.finetune
    batch = int(ft.batch_size or config.data.batch_size)
    if batch % strategy.num_replicas_in_sync:
        raise UserError(f"the global batch {batch} does not split over "
                        f"{strategy.num_replicas_in_sync} replicas")
    n_train = inputs.num_examples if inputs.indices is None else len(inputs.indices)
    steps_per_epoch = count_steps(n_train, batch)
    if steps_per_epoch == 0:
        raise UserError(f"{n_train} training images are fewer than one batch of {batch}")
    total_steps = int(ft.steps) or int(ft.epochs) * steps_per_epoch
    return Plan(batch, steps_per_epoch, total_steps, -(-total_steps // steps_per_epoch), n_train)


def before_finetuning(config, model, inputs: Inputs, out_dir, evaluate, log) -> dict:
    """Epoch 0: the slimmed network with re-estimated BN statistics (the stored ones no longer
    fit: spec section 9). Training starts from these statistics; a resumed run reads them."""
    ft = config.finetune
    before_path = os.path.join(out_dir, "before.json")
    resuming = tf.train.latest_checkpoint(os.path.join(out_dir, "checkpoints")) is not None
    if resuming and os.path.exists(before_path):
        with open(before_path) as f:
            return json.load(f)
    count = int(ft.bn_recalibration_images)
    if count > 0:
        images = recalibration_images(config, count, inputs.train_arrays, inputs.indices)
        with plain_batch_norm(model):  # one device, plain batch statistics
            recalibrate_batch_norm(model, images, batch_size=int(config.data.eval_batch_size))
    before = evaluate()
    before.update(bn_recalibration_images=count, step=0, epoch=0.0)
    atomic_write_json(before_path, before)
    log(f"slimmed network before fine-tuning (BN re-estimated on {count} training "
        f"images): test top-1 {before['top1']:.4f}")
    return before


def make_trainer(config, model, strategy, batch: int, total_steps: int, log):
    """The Trainer of finetune.mode's loss (distillation views: gradients averaged)."""
    ft = config.finetune
    mode = ft.mode
    with strategy.scope():
        optimizer = wrap_optimizer(train.make_optimizer(optimizer_config(config), total_steps),
                                   config.train.precision)
    views = 1 if mode == "plain" else int(ft.views)
    loss_fn = (train.cross_entropy_loss if mode == "plain" else
               make_distillation_loss(resolve_temperature(config), ft.teacher_selection,
                                      select=mode == "ekg"))
    jit = use_jit(config.train.jit_compile)
    cross_replica = strategy.num_replicas_in_sync > 1 and (
        bool(config.model.sync_bn) or (mode == "ekg" and ft.teacher_selection == "global"))
    if jit and cross_replica:
        # An all-reduce (global teacher selection, synchronised BN) cannot run inside the
        # XLA-compiled replica function (TF refuses merge_call there): train uncompiled.
        log("train.jit_compile ignored: cross-replica sums inside the step need an "
            "uncompiled replica function (set model.sync_bn=False and "
            "finetune.teacher_selection=replica to compile)")
        jit = False
    return train.Trainer(model, optimizer, strategy, batch, float(ft.weight_decay),
                         loss_fn=loss_fn, grad_scale=1.0 / views, jit_compile=jit,
                         fused_batch_norm=True, precision=config.train.precision), views


def training_settings(config, strategy, trainer) -> dict:
    """What the step ran with (the run report's settings; docs/performance.md)."""
    return {"strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync,
            "devices": list(getattr(strategy.extended, "worker_devices", [])),
            "precision": trainer.precision, "jit_compile": bool(trainer.jit_compile),
            "jit_compile_setting": str(config.train.jit_compile),
            "fused_batch_norm": True, "sync_bn": bool(config.model.sync_bn),
            "metrics_every_steps": int(config.train.log_every_steps),
            "input": "distribute_datasets_from_function, tf.data prefetch(AUTOTUNE), "
                     "prefetch to device (InputOptions.experimental_fetch_to_device)"}


def save_models(model, out_dir) -> tuple:
    """last.keras, and best.keras from the best checkpoint; returns (last, best or None)."""
    last_path = os.path.join(out_dir, "last.keras")
    best_path = os.path.join(out_dir, "best.keras")
    save_keras(model, last_path)
    best_ckpt = tf.train.latest_checkpoint(os.path.join(out_dir, "checkpoints", "best"))
    if best_ckpt:
        # A plain (not distributed) copy: creating variables in the strategy's scope is a
        # collective under MultiWorkerMirroredStrategy, and only the chief keeps a best
        # checkpoint in the workdir (the other workers' are in their scratch folders).
        best_model = keras.models.clone_model(model)
        tf.train.Checkpoint(model=best_model).restore(best_ckpt).expect_partial()
        save_keras(best_model, best_path)
    return last_path, best_path if best_ckpt else None


def run_finetune(config, workdir: str, log=None, stop_at_step: int | None = None,
                 strategy=None) -> dict:
    """Runs (or resumes) the fine-tuning of `workdir/search/subnet.json`; returns the result."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    config = resolve(config)
    check_settings(config)
    ft, dcfg = config.finetune, config.data
    out_dir = os.path.join(workdir, "finetune")
    os.makedirs(out_dir, exist_ok=True)
    keras.utils.set_random_seed(int(config.seed))
    strategy = strategy or make_strategy(config.strategy)
    mode = ft.mode
    temperature = resolve_temperature(config)

    inputs = check_inputs(config, workdir)
    gated, spec, weights_source = load_gated(config, workdir)
    teachers = open_teachers(config, workdir, gated, spec, inputs.num_examples,
                             inputs.train_arrays, log)
    steps = plan(config, inputs, strategy)
    model = build_slim(gated, spec, strategy, bool(config.model.sync_bn))
    complexity = flops.count_complexity(gated, spec.rates)
    full = flops.count_complexity(gated, {name: 1.0 for name in spec.groups})

    eval_fn, n_test = data.input_fn(dcfg, "test", False, int(dcfg.eval_batch_size),
                                    arrays=inputs.test_arrays)
    eval_step = train.make_eval_step(model, strategy, "inference")

    def evaluate():
        return train.evaluate(model, strategy, eval_fn, eval_step=eval_step)

    before = before_finetuning(config, model, inputs, out_dir, evaluate, log)
    trainer, views = make_trainer(config, model, strategy, steps.batch, steps.total_steps, log)

    def make_train_input(start_epoch, skip):
        fn, _ = train_input_fn(config, mode, teachers, steps.batch, steps.epochs, start_epoch,
                               skip, arrays=inputs.train_arrays, indices=inputs.indices)
        return strategy.distribute_datasets_from_function(fn)

    def plot(history):
        points = [before] + list(history)
        save_line_plot(os.path.join(out_dir, "accuracy_per_epoch.png"),
                       [h["epoch"] for h in points], {"test top-1": [h["top1"] for h in points]},
                       "epoch", "top-1",
                       f"{config.model.arch} fine-tuning ({mode}) on {dcfg.name}")

    with tf.summary.create_file_writer(os.path.join(out_dir, "tensorboard", "finetune")
                                       ).as_default():
        tf.summary.scalar("eval/top1", before["top1"], step=0)
    plot([])
    log(f"fine-tuning ({mode}, T={temperature:g}, {views} view(s), {steps.num_images} images, "
        f"{steps.total_steps} steps of {steps.batch})")
    result = train.fit(trainer, workdir=out_dir, make_train_input=make_train_input,
                       steps_per_epoch=steps.steps_per_epoch, total_steps=steps.total_steps,
                       evaluate_fn=evaluate,
                       checkpoint_every=int(config.train.checkpoint_every_steps),
                       keep_checkpoints=int(config.train.keep_checkpoints),
                       log_every=int(config.train.log_every_steps),
                       eval_every_epochs=int(config.train.eval_every_epochs), name="finetune",
                       on_epoch_end=plot, stop_at_step=stop_at_step)
    plot(result.history)
    last_path, best_path = save_models(model, out_dir)

    final = result.last_eval or evaluate()
    out = {"top1": final.get("top1"), "top5": final.get("top5"), "loss": final.get("loss"),
           "best_top1": result.best_eval.get("top1", final.get("top1")),
           "top1_before": before["top1"], "mode": mode, "temperature": temperature,
           "teachers": getattr(teachers, "num_teachers", 0),
           "teacher_selection": ft.teacher_selection if mode == "ekg" else None,
           "views": views, "epochs": round(result.epochs_done, 3), "steps": result.steps,
           "total_steps": steps.total_steps, "train_images": steps.num_images,
           "test_images": n_test, "seconds": round(result.seconds, 2),
           "images_per_second": round(result.images_per_second, 1),
           "macs": complexity.macs, "params": complexity.params,
           "macs_ratio": complexity.macs / full.macs, "params_ratio": complexity.params / full.params,
           "replicas": strategy.num_replicas_in_sync, "weights_source": weights_source,
           "settings": training_settings(config, strategy, trainer),
           "status": "done" if result.steps >= steps.total_steps else "incomplete",
           "best": best_path, "last": last_path, "workdir": workdir}
    atomic_write_json(os.path.join(out_dir, "result.json"), out)
    return out
