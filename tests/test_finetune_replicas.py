"""Fine-tuning under tf.distribute with 2 replicas (2 logical CPUs; run in a subprocess:
the CPU split must happen before TensorFlow initialises).

1. Pairing: a memory bank (written by the bank's own writer) whose logits encode the
   training index; through the shuffled, sharded 2-replica pipeline of
   `ekg_tf.finetune.runner.train_input_fn`, every replica's teacher logits decode to
   the index the pipeline yields with the image, labels match that index, the
   replicas' examples are disjoint and an epoch covers the training subset.
2. Global teacher selection: one Trainer step of the distillation loss on 2 replicas
   equals the same step on one device (loss and updated weights, 1e-5), while the
   reference's per-replica selection gives another result on a batch built so that
   the two halves select differently.
3. The slimmed ResNet-20 (synchronised BN) trains one EKG step on 2 replicas exactly
   as on one device (weights and BN moving statistics within 1e-4).
4. `run_finetune` end to end on 2 replicas; its test top-1 (a replica gets an empty
   last evaluation batch) equals that of the saved last.keras.
"""
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))


def main(out_dir):
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.path.insert(0, REPO)
    from ekg_tf.distribute import split_cpu_devices
    split_cpu_devices(2)
    import keras
    import tensorflow as tf

    from configs.synthetic import get_config
    from ekg_tf import data
    from ekg_tf.data import synthetic_split
    from ekg_tf.finetune import distill, runner
    from ekg_tf.graph.gated import GatedModel
    from ekg_tf.models import build_model
    from ekg_tf.subnet_search.memory_bank import MemoryBank, build_memory_bank
    from ekg_tf.slimming import slim_model
    from ekg_tf.train import Trainer

    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    one = tf.distribute.MirroredStrategy(["/cpu:0"])
    result = {}

    # ------------------------------------------------------------------ 1. pairing
    n, classes, num_teachers = 96, 10, 3

    class Group:
        """Stands in for a gate group: the writer sets `rank` and `rate` per teacher."""
        name, channels, rank = "g", 1, (0,)

        def __init__(self):
            self.var = tf.Variable(1.0)

        @property
        def rate(self):
            return float(self.var.numpy())

        @rate.setter
        def rate(self, value):
            self.var.assign(value)

    class IndexEncoder:
        """'Logits' = the example index (+ 0.25 per teacher), on every class."""
        num_classes = classes

        def __init__(self):
            self.group = Group()
            self.gate_groups = [self.group]

        def __call__(self, x, training=False, freeze_bn_stats=False):
            return tf.tile(tf.cast(x, tf.float32)[:, None], [1, classes]) + (1.0 - self.group.var)

    teachers = [{"step": t, "loss": 0.1 * t, "rates": {"g": 1.0 - 0.25 * t}, "ranks": {"g": [0]}}
                for t in range(num_teachers)]
    order = np.arange(n)
    batches = ((order[s:s + 40].astype(np.float32), order[s:s + 40], order[s:s + 40])
               for s in range(0, n, 40))
    bank_dir = os.path.join(out_dir, "bank")
    # The stand-in is not a ResNet: ask the writer for its mask-per-teacher path when it
    # also has a sliced (real-width ResNet) one.
    import inspect
    masked = ({"sliced": False} if "sliced" in inspect.signature(build_memory_bank).parameters
              else {})
    build_memory_bank(IndexEncoder(), teachers, batches, n, bank_dir, shard_size=32, **masked)
    bank = MemoryBank.open(bank_dir)

    config = get_config()
    arrays = synthetic_split(n, classes, 32, seed=0)
    arrays.y = np.random.default_rng(5).integers(0, classes, n)  # labels unrelated to order
    subset = np.sort(np.random.default_rng(1).choice(n, 64, replace=False))
    fn, _ = runner.train_input_fn(config, "ekg", bank, 16, epochs=2, arrays=arrays,
                                  indices=subset)
    dist = two.distribute_datasets_from_function(fn)

    def replica_fn(batch):
        images, labels, index, logits = batch
        decoded = tf.cast(tf.round(logits[:, 0, 0]), tf.int64)
        offsets = logits[:, :, :] - logits[:, :, :1]
        rid = tf.distribute.get_replica_context().replica_id_in_sync_group
        return (index, decoded, labels, tf.reduce_max(tf.abs(offsets - tf.constant(
            [0.0, 0.25, 0.5]))), tf.fill(tf.shape(index), rid), tf.shape(images))

    steps = []
    for step, batch in enumerate(dist):
        outs = two.run(replica_fn, args=(batch,))
        per = [[t.numpy() for t in two.experimental_local_results(o)] for o in outs]
        steps.append({"index": [p.tolist() for p in per[0]], "decoded": [p.tolist() for p in per[1]],
                      "labels": [p.tolist() for p in per[2]],
                      "offset_err": float(max(per[3])), "replica": [p.tolist() for p in per[4]],
                      "shape": [p.tolist() for p in per[5]]})
    result["pairing"] = {"steps": steps, "subset": subset.tolist(), "y": arrays.y.tolist()}

    # ------------------------------------------------------------------ 2. global selection
    T = 4.0
    rng = np.random.default_rng(0)
    top = rng.normal(0, 3, (8, 5)).astype(np.float32)
    tchr = np.stack([top, top + rng.normal(0, 0.3, (8, 5)), top + rng.normal(0, 2.0, (8, 5))],
                    -1).astype(np.float32)
    stud = np.stack([top * 0.3, top * 0.4], 1).astype(np.float32)
    stud[4:] = top[4:, None, :]  # second half: the student equals teacher 0 (d_student = 0)
    labels = rng.integers(0, 5, 8).astype(np.int32)

    def data_fn(context):  # one input pipeline: consecutive per-replica batches
        return tf.data.Dataset.from_tensor_slices((stud, labels, np.arange(8), tchr)).batch(
            context.get_per_replica_batch_size(8))

    def one_step(strategy, selection):
        with strategy.scope():
            model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(
                5, use_bias=False, kernel_initializer="identity")])
            opt = keras.optimizers.SGD(0.5)
        trainer = Trainer(model, opt, strategy, 8, 0.0, grad_scale=0.5,
                          loss_fn=distill.make_distillation_loss(T, selection))
        batch = next(iter(strategy.distribute_datasets_from_function(data_fn)))
        loss = float(trainer.train_step(batch).numpy()[0])
        return loss, model.get_weights()[0]

    plain_loss, _ = distill.ekg_loss(tf.constant(stud), tf.constant(labels), tf.constant(tchr),
                                     T, 8)
    sel = {}
    for name, strategy, selection in (("one", one, "global"), ("two_global", two, "global"),
                                      ("two_replica", two, "replica")):
        loss, kernel = one_step(strategy, selection)
        sel[name] = {"loss": loss, "kernel": kernel.tolist()}
    sel["direct_loss"] = float(plain_loss)
    half = [distill.teacher_mask(distill.selection_sums(
        tf.constant(stud[r]), tf.constant(tchr[r]), T)).numpy().tolist()
        for r in (slice(0, 4), slice(4, 8))]
    full = distill.teacher_mask(distill.selection_sums(
        tf.constant(stud), tf.constant(tchr), T)).numpy().tolist()
    sel["masks"] = {"half0": half[0], "half1": half[1], "global": full}
    result["selection"] = sel

    # ------------------------------------------------------------------ 3. slim ResNet-20, sync BN
    gated = GatedModel(build_model("resnet20", 10, input_shape=(16, 16, 3)))
    r = np.random.default_rng(2)
    for g in gated.gate_groups:
        g.rank = r.permutation(g.channels)
        g.rate = 0.5 if g.name.endswith("_conv1") else 1.0
    images = r.normal(size=(8, 2, 16, 16, 3)).astype(np.float32)
    lab = r.integers(0, 10, 8).astype(np.int32)
    tea = r.normal(0, 2, (8, 10, 3)).astype(np.float32)

    def slim_fn(context):
        return tf.data.Dataset.from_tensor_slices((images, lab, np.arange(8), tea)).batch(
            context.get_per_replica_batch_size(8))

    slim_out = {}
    for name, strategy in (("one", one), ("two", two)):
        model = runner.build_slim(gated, None, strategy, sync_bn=True)
        with strategy.scope():
            opt = keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)
        trainer = Trainer(model, opt, strategy, 8, 5e-4, grad_scale=0.5,
                          loss_fn=distill.make_distillation_loss(4.0))
        batch = next(iter(strategy.distribute_datasets_from_function(slim_fn)))
        loss = float(trainer.train_step(batch).numpy()[0])
        slim_out[name] = {"loss": loss, "weights": [w.ravel().tolist() for w in model.get_weights()],
                          "synchronized": sum(int(getattr(l, "synchronized", False))
                                              for l in model.layers)}
    result["slim"] = slim_out

    # ------------------------------------------------------------------ 4. the runner
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from test_finetune import make_search_workdir, small_config
    wd = os.path.join(out_dir, "run")
    make_search_workdir(wd)
    cfg = small_config(steps=2)
    # The same strategy object: a second MirroredStrategy over the same devices in one
    # process would reuse the collective instance keys of the first one.
    run = runner.run_finetune(cfg, wd, strategy=two)
    # 64 test images in a global eval batch of 128: the second replica's batch is empty.
    test = data.load_arrays(cfg.data, "test")
    last = keras.models.load_model(os.path.join(wd, "finetune", "last.keras"), compile=False)
    logits = last(data.normalize(test.x, cfg.data.name), training=False).numpy()
    result["runner"] = {"replicas": run["replicas"], "top1": run["top1"],
                        "examples": len(test.y), "steps": run["steps"],
                        "saved_top1": float(np.mean(np.argmax(logits, -1) == test.y))}
    del slim_model
    print(json.dumps(result))


def test_two_replicas(tmp_path):
    proc = subprocess.run([sys.executable, HERE, str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, timeout=600, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    # 1. pairing through shuffling and sharding
    p = out["pairing"]
    y, subset = np.array(p["y"]), p["subset"]
    assert len(p["steps"]) == 2 * (64 // 16)
    epochs = [[], []]
    for i, step in enumerate(p["steps"]):
        assert step["replica"] == [[0] * 8, [1] * 8]
        assert [s[:2] for s in step["shape"]] == [[8, 2], [8, 2]]  # 8 images x 2 views each
        for index, decoded, labels in zip(step["index"], step["decoded"], step["labels"]):
            assert decoded == index, f"teacher logits of another image: {decoded} vs {index}"
            assert labels == y[index].tolist()
        assert step["offset_err"] < 1e-3  # the teacher columns stay in order
        assert not set(step["index"][0]) & set(step["index"][1])
        epochs[i // 4] += step["index"][0] + step["index"][1]
    assert sorted(epochs[0]) == subset and sorted(epochs[1]) == subset
    assert epochs[0] != subset and epochs[0] != epochs[1]  # shuffled, reshuffled per epoch

    # 2. global selection: 2 replicas == 1 device; per-replica selection differs here
    s = out["selection"]
    assert s["masks"]["half0"] != s["masks"]["half1"]
    assert s["masks"]["half1"] == [0.0, 0.0, 0.0]
    assert abs(s["one"]["loss"] - s["direct_loss"]) <= 1e-5 * abs(s["direct_loss"])
    assert abs(s["two_global"]["loss"] - s["one"]["loss"]) <= 1e-5 * abs(s["one"]["loss"])
    np.testing.assert_allclose(s["two_global"]["kernel"], s["one"]["kernel"], atol=1e-5)
    assert abs(s["two_replica"]["loss"] - s["one"]["loss"]) > 1e-3
    assert np.abs(np.subtract(s["two_replica"]["kernel"], s["one"]["kernel"])).max() > 1e-4

    # 3. slimmed ResNet-20 with synchronised BN: one step equal on 1 and 2 replicas
    one, two = out["slim"]["one"], out["slim"]["two"]
    assert one["synchronized"] == 0 and two["synchronized"] > 0
    assert abs(one["loss"] - two["loss"]) <= 1e-4 * abs(one["loss"])
    for a, b in zip(one["weights"], two["weights"]):
        np.testing.assert_allclose(b, a, atol=1e-4)

    # 4. the whole runner on 2 replicas (sync BN, global selection, partial eval batches)
    run = out["runner"]
    assert run["replicas"] == 2 and run["steps"] == 2
    assert run["top1"] == run["saved_top1"]


if __name__ == "__main__":
    main(sys.argv[1])
