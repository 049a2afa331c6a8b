"""The Python API: EKG pruning of a Keras model in a few lines.

    import ekg_tf
    result = ekg_tf.prune(model, train_data, val_data, target_macs=0.45)
    result.model          # a plain, smaller keras.Model (fine-tuned)
    ekg_tf.export(result.model, "out/", formats=("saved_model", "tflite", "onnx"),
                  data=val_data)

Finer control, step by step (what `prune` does):

    graph = ekg_tf.dependency_graph(model)            # channel groups, pins
    found = ekg_tf.search(model, val_data, target_macs=0.45, adapt_data=train_data)
    small = ekg_tf.slim(found.gated, found.spec)      # physically pruned keras.Model
    found.spec.to_json("subnet.json")                 # an ekg_tf.SubnetSpec

Data are `(images, labels)` numpy arrays or a `tf.data.Dataset` of such pairs (batched
or not), already preprocessed the way the model expects (as for `model.fit`). A finite
dataset is read into memory once. Work runs under the `tf.distribute` strategy in
scope (build the model inside `strategy.scope()` to use several GPUs), or the one
given. `workdir` (optional) makes the search and the fine-tuning durable and resumable;
without it they run in a temporary directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from ekg_tf.errors import UserError
from ekg_tf.graph import dependency_graph
from ekg_tf.graph.gated import GatedModel
from ekg_tf.subnet import SubnetSpec

__all__ = ["PruneResult", "dependency_graph", "export", "prune", "run_export", "run_finetune",
           "run_pipeline", "run_search", "run_train", "search", "slim"]


# ----------------------------------------------------------------------------- from configs
# The stages of ekg-prune, each the function its own CLI runs (config, workdir) -> result;
# `run_pipeline` runs them in one durable workdir and writes the run report.
def run_pipeline(config, workdir, stages=None, overwrite=(), strategy=None, log=None) -> dict:
    """ekg-prune from Python: see `ekg_tf.pipeline.runner.run_pipeline`."""
    from ekg_tf.pipeline.runner import run_pipeline as run
    return run(config, workdir, stages=stages, overwrite=overwrite, strategy=strategy, log=log)


def run_train(config, workdir, **kwargs) -> dict:
    """ekg-train: see `ekg_tf.train.runner.run_train`."""
    from ekg_tf.train.runner import run_train as run
    return run(config, workdir, **kwargs)


def run_search(config, workdir, **kwargs) -> dict:
    """ekg-search: see `ekg_tf.subnet_search.pipeline.run_search`."""
    from ekg_tf.subnet_search.pipeline import run_search as run
    return run(config, workdir, **kwargs)


def run_finetune(config, workdir, **kwargs) -> dict:
    """ekg-finetune: see `ekg_tf.finetune.runner.run_finetune`."""
    from ekg_tf.finetune.runner import run_finetune as run
    return run(config, workdir, **kwargs)


def run_export(config, workdir, **kwargs) -> dict:
    """ekg-export: see `ekg_tf.export.runner.run_export` (returns the export report)."""
    from ekg_tf.export.runner import run_export as run
    return run(config, workdir, **kwargs)


# ----------------------------------------------------------------------------- data
def as_arrays(data, what: str, model=None) -> tuple:
    """(images float32, labels int64) from arrays or a tf.data.Dataset of (images, labels)."""
    if isinstance(data, tf.data.Dataset):
        rank = None if model is None else len(model.inputs[0].shape)
        xs, ys = [], []
        for element in data.as_numpy_iterator():
            if not isinstance(element, tuple) or len(element) != 2:
                raise UserError(f"{what}: the dataset must yield (images, labels) pairs")
            x, y = element
            batched = rank is not None and np.ndim(x) == rank
            xs.append(x if batched else x[None])
            ys.append(np.reshape(y, -1))
        if not xs:
            raise UserError(f"{what}: the dataset is empty")
        x, y = np.concatenate(xs), np.concatenate(ys)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1]).reshape(-1)
    else:
        raise UserError(f"{what} must be (images, labels) arrays or a tf.data.Dataset of "
                         f"(images, labels), got {type(data).__name__}")
    if len(x) != len(y) or len(x) == 0:
        raise UserError(f"{what}: {len(x)} images and {len(y)} labels; need the same, "
                         "non-zero count")
    if model is not None and tuple(x.shape[1:]) != tuple(model.inputs[0].shape[1:]):
        raise UserError(f"{what}: images of shape {tuple(x.shape[1:])}, the model takes "
                         f"{tuple(model.inputs[0].shape[1:])}")
    return x.astype(np.float32), y.astype(np.int64)


def _gated(model, strategy) -> GatedModel:
    if isinstance(model, GatedModel):
        return model
    if not isinstance(model, keras.Model):
        raise UserError(f"expected a keras.Model, got {type(model).__name__}")
    if strategy.num_replicas_in_sync > 1 and not _created_in(model, strategy):
        with strategy.scope():  # variables must be the strategy's to train on N replicas
            clone = keras.models.clone_model(model)
            clone.set_weights(model.get_weights())
        model = clone
    with strategy.scope():
        return GatedModel(model)


def _created_in(model, strategy) -> bool:
    return all(strategy.extended.variable_created_in_scope(v) for v in model.weights[:1])


@contextlib.contextmanager
def _directory(workdir):
    if workdir:
        yield str(workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="ekg_tf-") as tmp:
            yield tmp


def _log(log):
    return log or (lambda msg: None)


# ----------------------------------------------------------------------------- search
def search(model, data, target_macs: float = 0.45, *, adapt_data=None,
           adapt_learning_rate: float = 1e-3, batch_size: int = 256, search_step: float = 0.2,
           objective: str = "ekg", importance: str = "taylor", forward: str = "sliced",
           max_steps: int = 1000, workdir=None, strategy=None, log=None):
    """EKG sub-network search to `target_macs` (the fraction of MACs kept).

    `data`: the search's validation images (the reference takes the last 32 training
    images of each class); `adapt_data`: images for the short adaptation pass before
    it (the reference: 256 training images per class; None skips it). Returns the
    `SearchResult` (`.spec`, `.history`, `.macs_ratio`, ...) with `.gated`, the gated
    clone of `model` at the found sub-network (weights after adaptation).
    """
    from ekg_tf.subnet_search.adapt import adapt
    from ekg_tf.subnet_search.search import SearchSettings, search_subnetwork
    strategy = strategy or tf.distribute.get_strategy()
    gated = _gated(model, strategy)
    settings = SearchSettings(target_ratio=float(target_macs), search_step=search_step,
                              objective=objective, importance=importance, max_steps=max_steps)
    x, y = as_arrays(data, "data", gated.base)
    # BN uses batch statistics in the search: mixed classes in every batch (data sorted by
    # class would give single-class batches).
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    if adapt_data is not None:
        ax, ay = as_arrays(adapt_data, "adapt_data", gated.base)
        info = adapt(gated, ax, ay, learning_rate=adapt_learning_rate,
                     batch_size=min(256, len(ax) - len(ax) % strategy.num_replicas_in_sync),
                     strategy=strategy)
        _log(log)(f"adaptation pass: {info}")
    with _directory(workdir) as root:
        result, _ = search_subnetwork(gated, x, y, settings, os.path.join(root, "search"),
                                      strategy=strategy, batch_size=batch_size,
                                      forward=forward, log=log,
                                      fingerprint={"model": gated.arch_name,
                                                   "examples": int(len(x))})
    result.gated = gated
    return result


def slim(model, spec: SubnetSpec | None = None) -> keras.Model:
    """The physically pruned plain Keras model of `model` (a Keras model or its gated
    clone) under `spec` (default: the gated clone's current sub-network)."""
    from ekg_tf.slimming import slim_model
    gated = model if isinstance(model, GatedModel) else GatedModel(model)
    if spec is None and gated is not model:
        raise UserError("slim(model) of a plain model needs a spec (ekg_tf.search(...).spec)")
    return slim_model(gated, spec)


# ----------------------------------------------------------------------------- prune
@dataclasses.dataclass
class PruneResult:
    """What `prune` returns: the fine-tuned small model and how it was found."""
    model: keras.Model      # the pruned, fine-tuned plain Keras model
    spec: SubnetSpec        # the sub-network (kept channels of every group)
    search: object          # the SearchResult (history, ratios, the gated clone)
    metrics: dict           # macs/params ratios, val top-1 before/after, seconds


def _data_config(x):
    from ekg_tf.config import data_config
    cfg = data_config()
    cfg.name, cfg.normalization, cfg.image_size = "arrays", "none", int(x.shape[1])
    return cfg


def _adapt_indices(y, per_class: int = 256) -> np.ndarray:
    from ekg_tf.data import reference_split_indices
    idx = reference_split_indices(y, per_class, from_end=False)
    return idx[np.random.default_rng(0).permutation(len(idx))]


def _memory_bank(gated, history, mode, num_teachers, x, y, directory, temperature):
    from ekg_tf.subnet_search.memory_bank import (MemoryBank, build_memory_bank,
                                                  teachers_from_history)
    if mode == "plain":
        return None
    teachers = [history[0]] if mode == "kd" else teachers_from_history(history, num_teachers)
    # Teachers run with BN batch statistics: batches of mixed classes, rows kept by index.
    order = np.random.default_rng(0).permutation(len(x))
    batches = ((x[order[i:i + 256]], y[order[i:i + 256]], order[i:i + 256])
               for i in range(0, len(x), 256))
    build_memory_bank(gated, teachers, batches, len(x), directory, temperature=temperature)
    return MemoryBank.open(directory)


def prune(model, train_data, val_data, target_macs: float = 0.45, *, epochs: int = 10,
          batch_size: int = 128, learning_rate: float = 1e-2, mode: str = "ekg",
          num_teachers: int = 5, temperature: float = 4.0, views: int = 2,
          augment: bool = True, adapt: bool = True, search_batch_size: int = 256,
          workdir=None, strategy=None, seed: int = 0, log=None) -> PruneResult:
    """EKG pruning of `model` to `target_macs`: search, memory bank, fine-tuning.

    `train_data`: training images (adaptation pass, memory bank, fine-tuning);
    `val_data`: the search's validation images, also the accuracy reported. `mode`:
    `ekg` (ensemble-knowledge distillation from `num_teachers` sub-networks of the
    search), `kd` (the unpruned network as the only teacher) or `plain` (cross-entropy).
    Fine-tuning: SGD with Nesterov momentum, `learning_rate` decayed by 0.2 at 30/60/80%
    of `epochs`, weight decay 5e-4 (the reference's recipe); `augment` flips and shifts
    the images (each view independently); BN statistics are re-estimated on training
    images after slimming.
    """
    from ekg_tf import train
    from ekg_tf.config import train_config
    from ekg_tf.data import ArraySplit, input_fn
    from ekg_tf.finetune.distill import make_distillation_loss
    from ekg_tf.finetune.runner import MODES, with_teachers
    from ekg_tf.flops import ComplexityCounter
    from ekg_tf.slimming import recalibrate_batch_norm, slim_model
    if mode not in MODES:
        raise UserError(f"mode must be one of {MODES}, got {mode!r}")
    if epochs < 1:
        raise UserError(f"epochs must be >= 1, got {epochs}")
    start = time.time()
    log = _log(log)
    strategy = strategy or tf.distribute.get_strategy()
    gated = _gated(model, strategy)
    tx, ty = as_arrays(train_data, "train_data", gated.base)
    vx, vy = as_arrays(val_data, "val_data", gated.base)
    if len(tx) < batch_size:
        raise UserError(f"train_data has {len(tx)} images, fewer than one batch of {batch_size}")
    keras.utils.set_random_seed(seed)
    with _directory(workdir) as root:
        adapt_idx = _adapt_indices(ty) if adapt else None
        found = search(gated, (vx, vy), target_macs, batch_size=search_batch_size,
                       adapt_data=None if adapt_idx is None else (tx[adapt_idx], ty[adapt_idx]),
                       workdir=root, strategy=strategy, log=log)
        spec = found.spec
        bank = _memory_bank(gated, found.history, mode, num_teachers, tx, ty,
                            os.path.join(root, "memory_bank"), temperature)
        spec.apply_to(gated)  # the bank's writer set other sub-networks
        with strategy.scope():
            small = slim_model(gated, spec, name=f"{gated.arch_name}_pruned")
        train.synchronize_batch_norm(small, strategy)
        sample = np.random.default_rng(seed).permutation(len(tx))[:4096]
        recalibrate_batch_norm(small, tx[sample])  # training images, mixed classes
        cfg = _data_config(tx)
        eval_fn, _ = input_fn(cfg, "test", False, 256, arrays=ArraySplit(vx, vy))
        eval_step = train.make_eval_step(small, strategy)

        def evaluate():
            return train.evaluate(small, strategy, eval_fn, eval_step=eval_step)

        before = evaluate()
        n_views = 1 if mode == "plain" else views
        steps_per_epoch = len(tx) // batch_size
        total = epochs * steps_per_epoch
        recipe = train_config()  # SGD, Nesterov 0.9; the reference's fine-tuning schedule
        recipe.update(learning_rate=learning_rate, schedule="step",
                      decay_boundaries=(0.3, 0.6, 0.8), decay_factor=0.2, warmup_steps=0)
        with strategy.scope():
            optimizer = train.make_optimizer(recipe, total)
        loss_fn = (train.cross_entropy_loss if mode == "plain" else
                   make_distillation_loss(temperature, select=mode == "ekg"))
        trainer = train.Trainer(small, optimizer, strategy, batch_size, recipe.weight_decay,
                                loss_fn=loss_fn, grad_scale=1.0 / n_views)

        def make_train_input(start_epoch, skip):
            fn, _ = input_fn(cfg, "train", augment, batch_size, views=n_views, shuffle=True,
                             drop_remainder=True, with_index=True, seed=seed, epochs=epochs,
                             start_epoch=start_epoch, skip_batches=skip,
                             arrays=ArraySplit(tx, ty))
            return strategy.distribute_datasets_from_function(with_teachers(fn, bank))

        result = train.fit(trainer, workdir=os.path.join(root, "finetune"),
                           make_train_input=make_train_input, steps_per_epoch=steps_per_epoch,
                           total_steps=total, evaluate_fn=evaluate, name="finetune")
    train.synchronize_batch_norm(small, strategy, False)
    counter = ComplexityCounter(gated)
    count = counter.count(spec.rates)
    metrics = {"macs_ratio": count.macs / counter.full.macs,
               "params_ratio": count.params / counter.full.params,
               "macs": count.macs, "params": count.params,
               "val_top1_unpruned": found.history[0]["accuracy"],
               "val_top1_before_finetune": before["top1"],
               "val_top1": (result.last_eval or evaluate())["top1"],
               "search_steps": found.steps, "finetune_steps": result.steps,
               "seconds": time.time() - start}
    log(f"pruned: {metrics}")
    return PruneResult(small, spec, found, metrics)


# ----------------------------------------------------------------------------- export
def export(model: keras.Model, export_dir: str, formats=("saved_model", "tflite", "onnx"),
           quantize=("none",), data=None, representative_data=None, contract: str = "images",
           normalization=None, model_name: str = "ekg_model", version: int = 0,
           int8_calibration: str = "mse", latency_runs: int = 20, threads: int = 2,
           log=None) -> dict:
    """Writes and verifies the deployment artifacts of a (pruned) Keras model.

    `data`: (images, labels) the artifacts are checked on (logit differences, top-1
    agreement and accuracy); without it, 64 random normal images (no accuracy).
    `representative_data`: training images for full-int8 calibration (default: `data`).
    `normalization` (an `ekg_tf.data.preprocessing.Normalization`, or a name such as
    "cifar10" or "keras.applications.MobileNetV2") turns raw pixels into model inputs
    for the `images_uint8`/`image_bytes` contracts; by default the model takes its
    inputs as they are. Returns the export report (also written as
    `export_report.json`/`.md`); `report["status"]` is "ok" when every artifact passes.
    """
    from ekg_tf.data.preprocessing import Normalization, normalization_for
    from ekg_tf.export.exporter import ExportRequest, export_all
    if isinstance(normalization, str):
        normalization = normalization_for(normalization)
    normalization = normalization or Normalization((0.0,) * 3, (1.0,) * 3)
    if data is not None:
        x, y = as_arrays(data, "data", model)
    else:
        shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        x, y = np.random.default_rng(0).normal(size=(64, *shape)).astype(np.float32), None
    rep = None
    if representative_data is not None:
        rep = as_arrays(representative_data, "representative_data", model)[0]
    elif "int8" in quantize:
        rep = x if data is not None else None
    request = ExportRequest(
        slim=model, export_dir=str(export_dir), normalization=normalization, verify_uint8=x,
        verify_labels=y, formats=tuple(formats), quant_modes=tuple(quantize),
        representative=None if rep is None else normalization.numpy(rep)[:256],
        model_name=model_name, version=version, contract=contract,
        int8_calibration=int8_calibration, latency_runs=latency_runs, threads=threads)
    return export_all(request, progress=log or (lambda msg: None))
