"""The whole `ekg-search` job as a function: data, adaptation, search, outputs, memory bank.

`run_search(config, workdir)` returns the result dict that the CLI prints; every
stage is resumable (the search from its state, the memory bank is reused when a
complete one with the same teachers exists).
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import tensorflow as tf
import keras

from ekg_tf.config import resolve
from ekg_tf.data import load_arrays, normalize, num_classes_for, reference_split_indices
from ekg_tf.data.pipeline import input_fn
from ekg_tf.distribute import make_strategy
from ekg_tf.errors import UserError
from ekg_tf.finetune.runner import resolve_temperature
from ekg_tf.graph.gated import GatedModel
from ekg_tf.latency.model import search_latency_model
from ekg_tf.models.sources import model_from_config, model_identity, model_kind
from ekg_tf.subnet_search import evaluator as ev
from ekg_tf.subnet_search.adapt import adapt
from ekg_tf.subnet_search.memory_bank import (MemoryBank, build_memory_bank,
                                              teachers_from_history)
from ekg_tf.subnet_search.plots import save_search_plots
from ekg_tf.subnet_search.search import SearchSettings, search_subnetwork
from ekg_tf.subnet_search.state import load_state
from ekg_tf.slimming import bn_statistics, recalibrate_batch_norm, restore_bn_statistics
from ekg_tf.train.precision import check_precision
from ekg_tf.utils.io import atomic_path, atomic_write_json
from ekg_tf.utils.progress import ProgressBar


def _abs(path, workdir=None):
    """A file's absolute path (a keras.applications name stays as it is); a file inside
    `workdir` (ekg-prune's trained weights) relative to it, so that a copy of the workdir
    (another worker's) resumes too."""
    if not path or model_kind(path) == "application":
        return path or ""
    path = os.path.abspath(path)
    if workdir and path.startswith(os.path.abspath(workdir) + os.sep):
        return os.path.join("<workdir>", os.path.relpath(path, os.path.abspath(workdir)))
    return path


def run_fingerprint(config, workdir=None) -> dict:
    """What must not change between a search and its resumption."""
    d, s = config.data, config.search
    return {"arch": model_identity(config), "num_classes": num_classes_for(d),
            "init": _abs(config.model.init, workdir), "data_source": d.source, "data_name": d.name,
            "train_path": _abs(d.train_path), "image_size": int(d.image_size),
            "val_per_class": int(d.val_per_class), "adapt": bool(s.adapt),
            "adapt_per_class": int(d.adapt_per_class) if s.adapt else 0,
            "adapt_learning_rate": float(s.adapt_learning_rate) if s.adapt else 0.0,
            "batch_size": int(s.batch_size), "seed": int(config.seed),
            **SearchSettings.from_config(s).fingerprint()}


def _normalized(data_cfg, images):
    return normalize(images, data_cfg.get("normalization") or data_cfg.name).numpy()


def _save_weights(model, path):
    """The plain model's weights (a gated clone's are its model's)."""
    with atomic_path(path) as tmp:
        getattr(model, "base", model).save_weights(tmp)


def evaluate_test(model, config, log) -> dict:
    """Test top-1 of the current sub-network before fine-tuning, in both BN modes."""
    data = config.data
    rng = np.random.default_rng(int(config.seed) + 7)
    test = load_arrays(data, "test")
    order = rng.permutation(len(test))  # shuffled: BN batch statistics need mixed batches
    x_test, y_test = _normalized(data, test.x[order]), test.y[order]
    bs = int(data.eval_batch_size)
    out = {"test_examples": int(len(test)),
           "test_top1_bn_train_mode": ev.top1(ev.batch_logits(model, x_test, bs, True), y_test)}
    n_cal = int(config.search.bn_recalibration_images)
    if n_cal > 0:
        train = load_arrays(data, "train")
        idx = rng.permutation(len(train))[:n_cal]
        saved = bn_statistics(model)
        used = recalibrate_batch_norm(model, _normalized(data, train.x[idx]), bs)["images"]
        out["test_top1_bn_recalibrated"] = ev.top1(ev.batch_logits(model, x_test, bs, False),
                                                   y_test)
        out["bn_recalibration_train_images"] = used
        restore_bn_statistics(model, saved)
    log(f"test top-1 before fine-tuning: {out}")
    return out


def evaluate_baseline(model, config, path, log) -> dict:
    """Test top-1 of the network as given (before adaptation, BN inference mode): the
    baseline the pruned network is compared with. Kept in `path` for a resumed search."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    test = load_arrays(config.data, "test")
    logits = ev.batch_logits(model, _normalized(config.data, test.x),
                             int(config.data.eval_batch_size), False)
    out = {"baseline_test_top1": ev.top1(logits, test.y), "test_examples": int(len(test))}
    atomic_write_json(path, out)
    log(f"baseline (the unpruned network, BN inference mode): test top-1 "
        f"{out['baseline_test_top1']:.4f} on {len(test)} images")
    return out


def _memory_bank(model, config, workdir, history, log) -> dict:
    s = config.search
    teachers = teachers_from_history(history, int(s.num_teachers))
    precision = check_precision(s.memory_bank_precision, "search.memory_bank_precision")
    bank_dir = os.path.join(workdir, "memory_bank")
    dataset_fn, n = input_fn(config.data, "train", training=False,
                             global_batch_size=int(config.data.eval_batch_size),
                             with_index=True, shuffle=False, drop_remainder=False)
    try:
        bank = MemoryBank.open(bank_dir)
        same = ([t["step"] for t in bank.meta["teachers"]] == [t["step"] for t in teachers]
                and bank.num_examples == n and bank.topk == int(s.memory_bank_topk or 0)
                and bank.meta.get("precision", "float32") == precision)
        if same:
            log(f"memory bank in {bank_dir} is complete; reusing it")
            return bank.meta
    except FileNotFoundError:
        pass
    log(f"memory bank: {len(teachers)} teachers (steps {[t['step'] for t in teachers]}) "
        f"over {n} training images")
    bs = int(config.data.eval_batch_size)
    bar = ProgressBar(-(-n // bs), desc="memory bank", unit="img")
    batches = ((x.numpy(), y.numpy(), i.numpy()) for x, y, i in dataset_fn(None))
    meta = build_memory_bank(model, teachers, batches, n, bank_dir,
                             shard_size=int(s.memory_bank_shard_size),
                             topk=int(s.memory_bank_topk or 0),
                             temperature=resolve_temperature(config), progress=bar,
                             precision=precision,
                             extra_meta={"split": "train", "data": config.data.name})
    bar.close()
    return meta


def validation_set(config, train, rng):
    """The search's validation images: the last `data.val_per_class` training images of each
    class (the reference's protocol), shuffled so that every BN batch mixes classes."""
    data = config.data
    val_idx = reference_split_indices(train.y, int(data.val_per_class), from_end=True) \
        if int(data.val_per_class) > 0 else np.zeros(0, np.int64)
    val_idx = val_idx[rng.permutation(len(val_idx))]
    if len(val_idx) == 0:
        raise UserError("the validation set is empty: data.val_per_class must be > 0 and the "
                        "training split must hold images of every class")
    return _normalized(data, train.x[val_idx]), train.y[val_idx]


def adapted_weights(model, config, train, rng, search_dir, resuming, strategy, log) -> dict:
    """The search's weights: loaded when resuming, else the adaptation pass's (or the
    initial ones) saved to `search/weights.weights.h5`. Returns the adaptation's info."""
    data, s = config.data, config.search
    weights_path = os.path.join(search_dir, "weights.weights.h5")
    if resuming and os.path.exists(weights_path):
        model.base.load_weights(weights_path)
        log(f"resuming: weights of the search loaded from {weights_path}")
        return {}
    if resuming and s.adapt:
        raise UserError(f"{search_dir} holds a search state but not its adapted weights "
                        f"{weights_path}; delete {search_dir} to start again")
    info = {}
    if s.adapt:
        ad_idx = reference_split_indices(train.y, int(data.adapt_per_class), from_end=False)
        ad_idx = ad_idx[rng.permutation(len(ad_idx))]
        bs = int(s.adapt_batch_size)
        bar = ProgressBar(len(ad_idx) // max(bs, 1), desc="adaptation", unit="img")
        t0 = time.time()
        info = adapt(model, _normalized(data, train.x[ad_idx]), train.y[ad_idx],
                     learning_rate=float(s.adapt_learning_rate), batch_size=bs,
                     weight_decay=float(s.adapt_weight_decay), progress=bar,
                     strategy=strategy)
        bar.close()
        info["seconds"] = time.time() - t0
        log(f"adaptation pass: {info}")
    _save_weights(model, weights_path)
    return info


def search_outputs(model, result, evaluator, settings, search_dir,
                   latency_model=None) -> dict:
    """subnet.json, the plots, and the search's part of the result (with the predicted
    latency when the search had a latency model)."""
    spec_path = os.path.join(search_dir, "subnet.json")
    result.spec.to_json(spec_path)
    plots = save_search_plots(search_dir, result.history,
                              {g.name: g.channels for g in model.gate_groups},
                              result.spec.round_to)
    out = {"status": "done" if result.done else "incomplete",
            "flops_ratio": result.macs_ratio, "macs_ratio": result.macs_ratio,
            "params_ratio": result.params_ratio, "steps": result.steps,
            "search_seconds": result.search_seconds, "val_loss": result.val_loss,
            "val_top1": result.val_top1, "target_ratio": settings.target_ratio,
            "retraces_after_warmup": result.retraces_after_warmup,
            "trace_count": evaluator.trace_count, "subnet": spec_path,
            "weights": os.path.join(search_dir, "weights.weights.h5"), "plots": plots,
            "round_to": settings.round_to, "target_metric": settings.target_metric}
    if latency_model is not None:
        out["latency"] = {**latency_model.describe(), "target_ratio": result.target,
                          "target_ms": result.target * result.dense_latency_ms,
                          "predicted_ms": result.latency_ms,
                          "predicted_ratio": result.latency_ratio}
    return out


def memory_bank_outputs(model, config, workdir, result, log) -> dict:
    """Builds (or reuses) the memory bank; its part of the result."""
    t0 = time.time()
    meta = _memory_bank(model, config, workdir, result.history, log)
    result.spec.apply_to(model)  # the bank changed the masks
    return {"memory_bank": os.path.join(workdir, "memory_bank"),
            "memory_bank_bytes_per_image": meta["bytes_per_image"],
            "memory_bank_total_bytes": meta["total_bytes"],
            "memory_bank_teachers": [t["step"] for t in meta["teachers"]],
            "memory_bank_seconds": time.time() - t0}


def run_search(config, workdir: str, log=None, on_step=None, strategy=None) -> dict:
    """Runs (or resumes) the search described by `config` in `workdir`; returns the result.

    The adaptation pass, the scoring and the candidate evaluations run under `strategy`
    (default: `config.strategy`)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    config = resolve(config)
    strategy = strategy or make_strategy(config.strategy)
    tf.get_logger().setLevel("ERROR")  # tracing one function per start segment is by design
    t_start = time.time()
    settings = SearchSettings.from_config(config.search)
    search_dir = os.path.join(workdir, "search")
    fingerprint = run_fingerprint(config, workdir)
    resuming = load_state(search_dir, fingerprint) is not None  # refuses another run's state
    rng = np.random.default_rng(int(config.seed))

    train = load_arrays(config.data, "train")
    val_x, val_y = validation_set(config, train, rng)
    keras.utils.set_random_seed(int(config.seed))  # same initial weights when init is empty
    with strategy.scope():
        model = GatedModel(model_from_config(config), sync_bn=bool(config.model.sync_bn))
    model.set_round_to(settings.round_to)  # a round_to wider than a group fails before any work
    # The model holds its initial weights until adapted_weights (also when resuming).
    baseline = evaluate_baseline(model, config, os.path.join(search_dir, "baseline.json"), log)
    adapt_info = adapted_weights(model, config, train, rng, search_dir, resuming, strategy, log)

    s = config.search
    latency_model = search_latency_model(settings, model, str(s.get("latency_cache", "")),
                                         int(s.get("latency_max_cells", 256)), log)
    writer = tf.summary.create_file_writer(os.path.join(search_dir, "tb"))
    result, evaluator = search_subnetwork(
        model, val_x, val_y, settings, search_dir, strategy=strategy,
        batch_size=int(s.batch_size), forward=str(s.forward), cache_prefix=bool(s.cache_prefix),
        fingerprint=fingerprint, log=log, summary_writer=writer, on_step=on_step,
        rng_state={"seed": int(config.seed), "numpy_pcg64": rng.bit_generator.state},
        latency_model=latency_model)
    out = search_outputs(model, result, evaluator, settings, search_dir, latency_model)
    out.update(baseline)
    if adapt_info:
        out["adapt_seconds"] = adapt_info["seconds"]
    if not result.done:
        log(f"search stopped at step {result.steps} (search.max_steps) above the target; "
            "run the same command again with a larger search.max_steps to continue")
        out["total_seconds"] = time.time() - t_start
        return out
    out.update(evaluate_test(model, config, log))
    if s.build_memory_bank:
        out.update(memory_bank_outputs(model, config, workdir, result, log))
    out["total_seconds"] = time.time() - t_start
    atomic_write_json(os.path.join(search_dir, "result.json"), out)
    return out
