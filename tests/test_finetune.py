"""ekg-finetune end to end on a small problem: ResNet-8, synthetic (generated) images,
a sub-network and memory bank written the way ekg-search writes them (SubnetSpec.to_json,
the search's weights file, `build_memory_bank`).

Covered: clear errors (no subnet.json, mode ekg without a bank, a bank of another
split), an EKG run interrupted and resumed (outputs, best/last .keras files that
reproduce the reported accuracy), the plain ablation (one view), and the kd ablation
from the bank's unpruned-network column or from logits computed with the bank's protocol.

The parity of the slimmed network with the gated one (BN inference mode) for ResNet-20
and ResNet-50 (64x64) is tested in tests/test_slim.py; the 2-replica behaviour in
tests/test_finetune_replicas.py; the loss in tests/test_finetune_loss.py.
"""
import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from configs.synthetic import get_config  # noqa: E402
from ekg_tf import data  # noqa: E402
from ekg_tf.finetune import runner  # noqa: E402
from ekg_tf.graph.gated import GatedModel  # noqa: E402
from ekg_tf.models import build_model  # noqa: E402
from ekg_tf.subnet_search.memory_bank import MemoryBank, build_memory_bank  # noqa: E402
from ekg_tf.subnet import SubnetSpec  # noqa: E402
from ekg_tf.utils.cli import UserError  # noqa: E402

STANDARD = {"InputLayer", "Conv2D", "BatchNormalization", "ReLU", "Add",
            "GlobalAveragePooling2D", "Dense"}


def small_config(**finetune):
    config = get_config()
    config.data.synthetic_train_size = 128
    config.data.synthetic_test_size = 64
    config.data.batch_size = 32
    config.data.eval_batch_size = 128
    config.strategy = "one_device"
    config.train.log_every_steps = 2
    config.train.checkpoint_every_steps = 100
    config.finetune.bn_recalibration_images = 64
    config.finetune.learning_rate = 0.05
    config.finetune.update(finetune)
    return config


def inner(group) -> bool:
    """A block-internal group of the ResNet (the streams are tied by Add)."""
    return group.name.endswith("_conv1")


def history_entries(model, rng):
    entries = []
    for step, rate in enumerate([1.0, 0.75, 0.5]):
        entries.append({"step": step, "loss": 0.1 * step,
                        "rates": {g.name: (rate if inner(g) else 1.0)
                                  for g in model.gate_groups},
                        "ranks": {g.name: [int(v) for v in rng.permutation(g.channels)]
                                  for g in model.gate_groups}})
    return entries


def make_search_workdir(path, teacher_steps=(0, 1), bank=True, train_size=128):
    """search/subnet.json + search/weights.weights.h5 (+ memory_bank/), as ekg-search writes."""
    config = small_config()
    config.data.synthetic_train_size = train_size
    keras.utils.set_random_seed(0)
    model = GatedModel(build_model("resnet8", 10, input_shape=(32, 32, 3)))
    entries = history_entries(model, np.random.default_rng(0))
    final = entries[-1]
    for g in model.gate_groups:
        g.rank, g.rate = final["ranks"][g.name], final["rates"][g.name]
    os.makedirs(os.path.join(path, "search"), exist_ok=True)
    SubnetSpec.from_model(model).to_json(os.path.join(path, "search", "subnet.json"))
    model.base.save_weights(os.path.join(path, "search", "weights.weights.h5"))
    if bank:
        fn, n = data.input_fn(config.data, "train", False, 128, with_index=True, shuffle=False,
                              drop_remainder=False)
        batches = ((x.numpy(), y.numpy(), i.numpy()) for x, y, i in fn(None))
        build_memory_bank(model, [entries[s] for s in teacher_steps], batches, n,
                          os.path.join(path, "memory_bank"), shard_size=100)
    return str(path)


@pytest.fixture(scope="module")
def search_workdir(tmp_path_factory):
    return make_search_workdir(tmp_path_factory.mktemp("search"))


def fresh_workdir(tmp_path, search_workdir):
    for name in ("search", "memory_bank"):
        os.symlink(os.path.join(search_workdir, name), tmp_path / name)
    return str(tmp_path)


def test_missing_search_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="(?i)run ekg-search first"):
        runner.run_finetune(small_config(steps=2), str(tmp_path))


def test_ekg_without_bank_and_mismatched_bank(tmp_path, search_workdir):
    no_bank = tmp_path / "no_bank"
    os.makedirs(no_bank)
    os.symlink(os.path.join(search_workdir, "search"), no_bank / "search")
    with pytest.raises(UserError, match="needs the memory bank.*mode=plain"):
        runner.run_finetune(small_config(steps=2), str(no_bank))
    # The bank holds 128 training images; a 160-image split is other data.
    config = small_config(steps=2)
    config.data.synthetic_train_size = 160
    with pytest.raises(UserError, match="holds 128 examples x 10 classes.*160 examples"):
        runner.run_finetune(config, fresh_workdir(tmp_path, search_workdir))


def test_ekg_interrupted_resumed_and_outputs(tmp_path, search_workdir):
    wd = fresh_workdir(tmp_path, search_workdir)
    config = small_config(epochs=1)  # 128 images / 32 = 4 steps
    first = runner.run_finetune(config, wd, stop_at_step=2)
    assert first["status"] == "incomplete" and first["steps"] == 2
    result = runner.run_finetune(config, wd)
    assert result["status"] == "done" and result["steps"] == 4 and result["total_steps"] == 4
    assert result["top1_before"] == first["top1_before"]  # epoch 0 measured once
    for key in ("top1", "top5", "epochs", "macs", "params", "seconds", "mode", "top1_before"):
        assert key in result, key
    assert result["mode"] == "ekg" and result["views"] == 2 and result["teachers"] == 2
    assert result["temperature"] == 4.0 and result["epochs"] == 1.0
    out = os.path.join(wd, "finetune")
    with open(os.path.join(out, "result.json")) as f:
        assert json.load(f)["top1"] == result["top1"]
    for name in ("accuracy_per_epoch.png", "before.json", "best.keras", "last.keras"):
        assert os.path.exists(os.path.join(out, name)), name
    assert os.listdir(os.path.join(out, "tensorboard", "finetune"))
    with open(os.path.join(out, "finetune_state.json")) as f:
        assert [h["step"] for h in json.load(f)["history"]] == [4]

    # The saved models are plain Keras models that reproduce the reported test accuracy.
    test = data.load_arrays(config.data, "test")
    x = data.normalize(test.x, config.data.name).numpy()
    for name, expected in (("last.keras", result["top1"]), ("best.keras", result["best_top1"])):
        model = keras.models.load_model(os.path.join(out, name), compile=False)
        assert {type(l).__name__ for l in model.layers} <= STANDARD
        assert not any(getattr(l, "synchronized", False) for l in model.layers)
        top1 = float(np.mean(np.argmax(model(x, training=False).numpy(), -1) == test.y))
        assert top1 == pytest.approx(expected, abs=1e-6), name
    spec = SubnetSpec.from_json(os.path.join(wd, "search", "subnet.json"))
    conv1 = model.get_layer("block0_0_conv1").kernel.shape[-1]
    assert conv1 == spec.groups["block0_0_conv1"].kept < 16


def test_plain_ablation(tmp_path, search_workdir):
    os.symlink(os.path.join(search_workdir, "search"), tmp_path / "search")  # no bank needed
    result = runner.run_finetune(small_config(mode="plain", steps=3), str(tmp_path))
    assert result["mode"] == "plain" and result["views"] == 1 and result["teachers"] == 0
    assert result["steps"] == 3 and np.isfinite(result["top1"])


def test_kd_uses_the_unpruned_network(tmp_path, search_workdir):
    config = small_config(mode="kd", steps=2)
    arrays = data.load_arrays(config.data, "train")
    # 1. The bank holds history step 0 (the unpruned network): kd uses that column.
    gated, spec, _ = runner.load_gated(config, search_workdir)
    column = runner.unpruned_teacher(config, search_workdir, gated, spec, 128, arrays, print)
    bank = MemoryBank.open(os.path.join(search_workdir, "memory_bank"))
    assert column.num_teachers == 1 and bank.num_teachers == 2
    np.testing.assert_array_equal(column.lookup([3, 7]), bank.lookup([3, 7])[:, :, :1])
    np.testing.assert_array_equal(column.tf_lookup(tf.constant([3, 7])).numpy(),
                                  bank.lookup([3, 7])[:, :, :1])

    # 2. A bank without it: the run computes the unpruned network's logits once, with the
    # bank's protocol (stored order, batches of eval_batch_size, BN batch statistics, no
    # augmentation), into finetune/kd_teacher/, and trains with it as the only teacher.
    other = str(tmp_path / "other")
    make_search_workdir(other, teacher_steps=(1, 2))
    result = runner.run_finetune(config, other)
    assert result["mode"] == "kd" and result["teachers"] == 1 and result["views"] == 2
    teacher = MemoryBank.open(os.path.join(other, "finetune", "kd_teacher"))
    gated, spec, _ = runner.load_gated(config, other)
    for g in gated.gate_groups:
        g.rate = 1.0
    x = data.normalize(arrays.x, config.data.name)
    dense = gated(x, training=True, freeze_bn_stats=True).numpy()
    got = teacher.lookup(np.arange(128))[:, :, 0]
    np.testing.assert_allclose(got, dense, atol=2e-3 * max(1.0, np.abs(dense).max()))
