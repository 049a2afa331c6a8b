"""The training loop: resume == uninterrupted, NaN stop, and 2 replicas == 1 device."""
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from ekg_tf import data, train
from ekg_tf.config import base_config
from ekg_tf.distribute import make_strategy
from ekg_tf.models import build_model

from conftest import REPO_ROOT, TESTS_DIR


def _config():
    config = base_config()
    config.model.arch = "resnet20"
    config.data.update(source="synthetic", name="synthetic", synthetic_train_size=96,
                       synthetic_test_size=32, batch_size=16)
    config.train.update(learning_rate=0.05, schedule="step", decay_boundaries=(0.5,))
    return config


def _run(workdir, total_steps, stop_at_step=None, learning_rate=None, checkpoint_every=4):
    config = _config()
    if learning_rate:
        config.train.learning_rate = learning_rate
    keras.utils.set_random_seed(0)
    strategy = make_strategy("one_device")
    with strategy.scope():
        model = build_model("resnet20", 10)
        optimizer = train.make_optimizer(config.train, total_steps)
    trainer = train.Trainer(model, optimizer, strategy, 16, weight_decay=5e-4)
    dcfg = config.data
    spe = data.pipeline.steps_per_epoch(96, 16)
    epochs = -(-total_steps // spe)

    def make_input(start_epoch, skip):
        fn, _ = data.input_fn(dcfg, "train", True, 16, epochs=epochs, start_epoch=start_epoch,
                              skip_batches=skip)
        return strategy.distribute_datasets_from_function(fn)

    result = train.fit(trainer, workdir=str(workdir), make_train_input=make_input,
                       steps_per_epoch=spe, total_steps=total_steps, checkpoint_every=checkpoint_every,
                       log_every=2, stop_at_step=stop_at_step)
    return result, [v.numpy() for v in model.weights]


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    _, straight = _run(tmp_path / "a", total_steps=10)
    first, _ = _run(tmp_path / "b", total_steps=10, stop_at_step=7)  # "killed" after step 7
    assert first.steps == 7
    resumed, weights = _run(tmp_path / "b", total_steps=10)
    assert resumed.steps == 10
    for a, b in zip(straight, weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert os.path.exists(tmp_path / "b" / "tensorboard" / "train")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(train.TrainingDiverged, match=r"diverged at step (\d+).*"
                       r"Last good checkpoint: .*ckpt-\d+") as e:
        _run(tmp_path, total_steps=60, learning_rate=1e6, checkpoint_every=1)
    import re
    nan_step, ckpt_step = map(int, re.search(r"step (\d+).*ckpt-(\d+)", str(e.value)).groups())
    assert ckpt_step == nan_step - 1  # every finite step was checkpointed, the NaN one was not
    ckpts = tf.train.get_checkpoint_state(str(tmp_path / "checkpoints"))
    assert ckpts.model_checkpoint_path.endswith(f"ckpt-{ckpt_step}")
    reader = tf.train.load_checkpoint(ckpts.model_checkpoint_path)
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), name


_MIRRORED = textwrap.dedent("""
    import numpy as np
    from ekg_tf.distribute import split_cpu_devices
    split_cpu_devices(2)
    import tensorflow as tf
    from one_training_step import one_training_step

    def one_step(devices):
        strategy = tf.distribute.MirroredStrategy(devices)
        return (*one_training_step(strategy), strategy.num_replicas_in_sync)

    b1, w1, n1 = one_step(["/cpu:0"])
    b2, w2, n2 = one_step(["/cpu:0", "/cpu:1"])
    assert (n1, n2) == (1, 2)
    assert max(np.abs(p - q).max() for p, q in zip(b1, b2)) == 0.0
    moved = max(np.abs(p - q).max() for p, q in zip(w1, b1))
    diff = max(np.abs(p - q).max() for p, q in zip(w1, w2))
    print("moved", moved, "diff", diff)
    # float32: sync-BN sums vs one-device two-pass moments differ by rounding only
    assert moved > 1e-2 and diff < 1e-4 and diff / moved < 2e-4, (moved, diff)
""")



def test_one_step_on_two_replicas_equals_one_device():
    """Same global batch of 16: 2 logical CPUs x 8 (sync BN) vs 1 device x 16."""
    out = subprocess.run([sys.executable, "-c", _MIRRORED], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, TESTS_DIR]),
                                  TF_CPP_MIN_LOG_LEVEL="2"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "moved" in out.stdout
