"""Memory bank: the teachers' logits over the training set, for ensemble-knowledge fine-tuning.

Teachers (spec section 5): the search history (the unpruned network first, the
final sub-network excluded) sorted by validation loss; `num_teachers` entries are
taken whose losses are nearest to evenly spaced targets from the lowest loss
upward, without repeats. Teacher 0 is the lowest-loss one. Their logits are
computed on the whole training split, no augmentation, BN in training mode
(batch statistics of consecutive batches, moving statistics untouched).

On-disk format (`workdir/memory_bank/`), written shard by shard while streaming
the training split (never the whole bank in RAM):
- `meta.json` (written last: its presence means the bank is complete): sizes,
  teachers, format, bytes per image;
- dense (`memory_bank_topk = 0`): `logits-SSSSS.npy`, float16 `[n, classes, teachers]`;
- top-k (`memory_bank_topk = k`): `topk_values-SSSSS.npy` float16 `[n, k, teachers]`,
  `topk_indices-SSSSS.npy` int16 `[n, k, teachers]` (int32 above 32,767 classes),
  `tail-SSSSS.npy` float16 `[n, teachers]`.
Rows are the examples' positions in the training split (`input_fn(...,
with_index=True)` yields that index), so a shuffled, sharded pipeline stays paired.

Sizes. Dense float16 costs `classes * teachers * 2` bytes per image: CIFAR-10
with 5 teachers 100 B/image (5 MB for 50,000 images); ImageNet (1.28 M images x
1000 classes x 5 teachers) 10,000 B/image = 12.8 GB (25.6 GB in float32). The
top-k option stores, per teacher, the k largest logits (float16), their class ids
(int16) and one float16 "tail" logit: `teachers * (4k + 2)` bytes per image,
e.g. k = 20 for ImageNet: 410 B/image, 0.52 GB in all (25x smaller).

Effect of top-k on the distillation target: `lookup` rebuilds dense logits with
the k stored logits exact and every other class set to the tail value
`v = T * (logsumexp(x_tail / T) - log(classes - k))`, computed at the fine-tuning
temperature T when the bank is built. So `softmax(logits / T)` is exact for the k
top classes and for the total probability of the other classes, which is spread
evenly over them (the tail's shape is lost; at other temperatures the tail mass is
approximate). Argmax/top-k agreement and the teacher-selection KL are dominated by
the top classes; the dense form is exact up to float16 rounding (~1e-3 relative).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import time

import numpy as np
import tensorflow as tf

from ekg_tf.distribute import any_batch_spec
from ekg_tf.errors import UserError
from ekg_tf.train.precision import check_precision
from ekg_tf.utils.io import atomic_path, atomic_write_json

FORMAT = "ekg-memory-bank-v1"


# --------------------------------------------------------------------------- teacher selection
def select_teachers(losses, num_teachers: int) -> list:
    """Indices (into `losses`) of the teachers, teacher 0 = lowest loss.

    As the reference: sort by loss (ties keep history order), targets evenly spaced
    from the lowest loss upward (`min + i*(max-min)/num_teachers`), each target takes
    the nearest not yet chosen entry. Fewer entries than teachers: all of them.
    """
    losses = np.asarray(losses, np.float64)
    if losses.size == 0:
        raise ValueError("select_teachers: the history is empty")
    if num_teachers < 1:
        raise UserError(f"search.num_teachers must be >= 1, got {num_teachers}")
    order = np.argsort(losses, kind="stable")
    sorted_losses = losses[order] + np.arange(losses.size) * 1e-12
    n = min(num_teachers, losses.size)
    lo, hi = sorted_losses[0], sorted_losses[-1]
    targets = lo + np.arange(n) * (hi - lo) / num_teachers
    available = sorted_losses.copy()
    chosen = []
    for t in targets:
        j = int(np.argmin(np.abs(t - available)))
        chosen.append(int(order[j]))
        available[j] = np.inf
    return chosen


def teachers_from_history(history: list, num_teachers: int) -> list:
    """The history entries taught from (the final sub-network excluded), teacher 0 first."""
    entries = history[:-1]
    return [entries[i] for i in select_teachers([e["loss"] for e in entries], num_teachers)]


# --------------------------------------------------------------------------- writing
def bytes_per_image(num_classes: int, num_teachers: int, topk: int = 0) -> int:
    if topk and topk < num_classes:
        index_bytes = 2 if num_classes <= 32767 else 4
        return num_teachers * (topk * (2 + index_bytes) + 2)
    return num_classes * num_teachers * 2


def compress_topk(logits, k: int, temperature: float):
    """[n, classes] float -> (values [n,k] f16, indices [n,k], tail [n] f16)."""
    logits = np.asarray(logits, np.float64)
    n, c = logits.shape
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(logits, idx, 1)
    mask = np.ones_like(logits, bool)
    np.put_along_axis(mask, idx, False, 1)
    rest = np.where(mask, logits / temperature, -np.inf)
    m = rest.max(1, keepdims=True)
    lse = (m + np.log(np.exp(rest - m).sum(1, keepdims=True)))[:, 0]
    tail = temperature * (lse - np.log(c - k))
    itype = np.int16 if c <= 32767 else np.int32
    return values.astype(np.float16), idx.astype(itype), tail.astype(np.float16)


def _save_npy(path, array):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


class _ShardWriter:
    """Rows land in shard buffers by example index; a shard is written once full."""

    def __init__(self, out_dir, num_examples, num_classes, t_count, shard_size, topk,
                 temperature):
        self.out_dir, self.num_examples = out_dir, num_examples
        self.shape = (shard_size, num_classes, t_count)
        self.shard_size, self.topk, self.temperature = shard_size, topk, temperature
        self.buffers, self.filled = {}, {}

    def rows(self, shard):
        return min(self.shard_size, self.num_examples - shard * self.shard_size)

    def add(self, index, logits):
        for shard in np.unique(index // self.shard_size):
            sel = index // self.shard_size == shard
            if shard not in self.buffers:
                self.buffers[shard] = np.zeros(self.shape, np.float32)
                self.filled[shard] = np.zeros(self.rows(shard), bool)
            self.buffers[shard][index[sel] % self.shard_size] = logits[sel]
            self.filled[shard][index[sel] % self.shard_size] = True
            if self.filled[shard].all():
                self.flush(shard)

    def flush(self, shard):
        buf = self.buffers.pop(shard)[:self.rows(shard)]
        out = self.out_dir
        if self.topk:
            parts = [compress_topk(buf[:, :, t], self.topk, self.temperature)
                     for t in range(buf.shape[2])]
            _save_npy(os.path.join(out, f"topk_values-{shard:05d}.npy"),
                      np.stack([p[0] for p in parts], -1))
            _save_npy(os.path.join(out, f"topk_indices-{shard:05d}.npy"),
                      np.stack([p[1] for p in parts], -1))
            _save_npy(os.path.join(out, f"tail-{shard:05d}.npy"),
                      np.stack([p[2] for p in parts], -1))
        else:
            _save_npy(os.path.join(out, f"logits-{shard:05d}.npy"), buf.astype(np.float16))

    def incomplete(self) -> list:
        return sorted(int(s) for s in self.buffers)


def _teacher_logits_fn(model, teachers, sliced: bool, precision: str):
    """images -> float32 [B, classes, teachers] (each teacher at its real width when
    `sliced`, computed in `precision`; otherwise the model's masks are set per teacher)."""
    if not sliced and precision != "float32":
        raise ValueError("a memory bank in reduced precision runs the sliced forward")
    num_classes, t_count = int(model.num_classes), len(teachers)
    groups = {g.name: g for g in model.gate_groups}

    def apply(entry):
        for name, g in groups.items():
            g.rank = entry["ranks"][name]
            g.rate = min(max(float(entry["rates"][name]), 0.0), 1.0)

    forward = tf.function(lambda x: model(x, training=True, freeze_bn_stats=True),
                          autograph=False)
    if sliced:  # each teacher at its real width: cost in proportion to its MACs
        from ekg_tf.subnet_search.evaluator import kept_indices_of, subnets_logits_fn
        teachers_fn = subnets_logits_fn(model, [kept_indices_of(model, e) for e in teachers],
                                        precision=precision)

    def logits(images):
        x = tf.cast(tf.convert_to_tensor(images), tf.float32)
        if sliced:
            return teachers_fn(x).numpy()
        forward.get_concrete_function(any_batch_spec(x.shape))  # a cache hit after the first
        out = np.empty((len(images), num_classes, t_count), np.float32)
        for t, entry in enumerate(teachers):
            apply(entry)
            out[:, :, t] = forward(x).numpy()
        return out

    return logits


def build_memory_bank(model, teachers: list, batches, num_examples: int, out_dir: str,
                      shard_size: int = 10_000, topk: int = 0, temperature: float = 4.0,
                      progress=None, extra_meta: dict | None = None,
                      sliced: bool = True, precision: str = "float32") -> dict:
    """Computes and writes the teachers' logits; returns the meta dict.

    teachers: history entries (dicts with 'rates', 'ranks', 'loss', 'step'), teacher 0 first.
    batches: iterable of (images, labels, index) in split order (images normalised,
    no augmentation). `sliced`: run each teacher at its real width (same logits, faster);
    otherwise the model's masks are set per teacher (callers restore them).
    `precision` (`search.memory_bank_precision`, `train.precision`'s names): the dtype the
    teachers compute in (mixed_bfloat16: bfloat16 layers from the float32 weights; the
    logits are stored in float16 whatever it is).
    """
    if not teachers:
        raise ValueError("build_memory_bank needs at least one teacher")
    num_classes = int(model.num_classes)
    t_count = len(teachers)
    topk = int(topk or 0)
    if topk >= num_classes:
        topk = 0
    if shard_size < 1:
        raise UserError(f"search.memory_bank_shard_size must be >= 1, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # rebuilding: the bank is incomplete until meta.json is back
    num_shards = -(-num_examples // shard_size)
    precision = check_precision(precision, "search.memory_bank_precision")
    teacher_logits = _teacher_logits_fn(model, teachers, sliced, precision)
    writer = _ShardWriter(out_dir, num_examples, num_classes, t_count, shard_size, topk,
                          temperature)
    t0 = time.time()
    seen = 0
    # The shard buffers and files are written by one background thread while the next
    # batch's teachers run (top-k compression of a shard is seconds of numpy work).
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bank-writer") as pool:
        pending = None
        for images, _, index in batches:
            index = np.asarray(index, np.int64)
            out = teacher_logits(images)
            if index.min() < 0 or index.max() >= num_examples:
                raise ValueError(f"example index {index.max()} outside the split of "
                                 f"{num_examples}")
            if pending is not None:
                pending.result()  # in order, one batch in flight; re-raises its error
            pending = pool.submit(writer.add, index, out)
            seen += len(index)
            if progress is not None:
                progress.update(1, items=len(index))
        if pending is not None:
            pending.result()
    missing = writer.incomplete()
    if missing or seen < num_examples:
        raise ValueError(f"the training split yielded {seen} of {num_examples} examples; "
                         f"shards {missing} incomplete")
    meta = {"format": FORMAT, "num_examples": int(num_examples), "num_classes": num_classes,
            "num_teachers": t_count, "topk": topk, "temperature": float(temperature),
            "shard_size": int(shard_size), "num_shards": int(num_shards),
            "dtype": "float16", "precision": precision,
            "bytes_per_image": bytes_per_image(num_classes, t_count, topk),
            "total_bytes": int(sum(os.path.getsize(os.path.join(out_dir, f))
                                   for f in os.listdir(out_dir) if f.endswith(".npy"))),
            "seconds": time.time() - t0,
            "teachers": [{"step": int(e["step"]), "loss": float(e["loss"]),
                          "macs_ratio": float(e.get("macs_ratio", 1.0))} for e in teachers]}
    meta.update(extra_meta or {})
    atomic_write_json(meta_path, meta)
    return meta


# --------------------------------------------------------------------------- reading
class MemoryBank:
    """Reader: `MemoryBank.open(dir)`; `.lookup(indices) -> float32 [B, classes, teachers]`.

    Shards are memory-mapped, so lookups read only the requested rows. In tf.data:
    `ds.map(bank.attach_fn())` turns `(images, labels, index)` batches into
    `(images, labels, teacher_logits)`; or call `bank.tf_lookup(index)` yourself.
    """

    def __init__(self, directory: str, meta: dict):
        self.directory = directory
        self.meta = meta
        self.num_examples = int(meta["num_examples"])
        self.num_classes = int(meta["num_classes"])
        self.num_teachers = int(meta["num_teachers"])
        self.topk = int(meta.get("topk", 0))
        self.shard_size = int(meta["shard_size"])
        self.bytes_per_image = int(meta["bytes_per_image"])
        self._shards = {}

    @classmethod
    def open(cls, directory: str) -> "MemoryBank":
        meta_path = os.path.join(directory, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"no complete memory bank in {directory!r} (meta.json "
                                    "missing): run ekg-search with search.build_memory_bank=True")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise UserError(f"{meta_path}: unknown memory bank format {meta.get('format')!r}")
        return cls(directory, meta)

    def _shard(self, s):
        if s not in self._shards:
            def load(prefix):
                return np.load(os.path.join(self.directory, f"{prefix}-{s:05d}.npy"),
                               mmap_mode="r")
            if self.topk:
                self._shards[s] = (load("topk_values"), load("topk_indices"), load("tail"))
            else:
                self._shards[s] = (load("logits"),)
        return self._shards[s]

    def lookup(self, indices) -> np.ndarray:
        """Teacher logits of training examples `indices` -> float32 [B, classes, teachers]."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
            raise IndexError(f"memory bank has {self.num_examples} examples; got index "
                             f"{indices.min()}..{indices.max()}")
        out = np.empty((indices.size, self.num_classes, self.num_teachers), np.float32)
        shards = indices // self.shard_size
        for s in np.unique(shards):
            sel = np.flatnonzero(shards == s)
            rows = indices[sel] % self.shard_size
            order = np.argsort(rows)  # sorted reads of the memory map
            arrays = self._shard(int(s))
            if self.topk:
                values, idx, tail = (a[rows[order]] for a in arrays)
                dense = np.repeat(tail.astype(np.float32)[:, None, :], self.num_classes, 1)
                np.put_along_axis(dense, idx.astype(np.int64), values.astype(np.float32), 1)
                out[sel[order]] = dense
            else:
                out[sel[order]] = arrays[0][rows[order]].astype(np.float32)
        return out

    def tf_lookup(self, indices):
        """`lookup` as a TF op (tf.numpy_function), usable inside tf.data maps."""
        out = tf.numpy_function(lambda i: self.lookup(i), [indices], tf.float32,
                                stateful=False)
        out.set_shape([None, self.num_classes, self.num_teachers])
        return out

    def attach_fn(self):
        """Map function: (images, labels, index) -> (images, labels, teacher_logits)."""
        def fn(images, labels, index):
            return images, labels, self.tf_lookup(index)
        return fn
