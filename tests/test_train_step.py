"""The fast training step gives the results of the plain one.

- fused BatchNormalization (`ekg_tf.train.fused_bn`) == Keras' BatchNormalization: outputs,
  gradients, moving statistics, inference;
- the distillation views as one batch of 2B == two passes (BN alike), and BN's statistics
  are those of both views (the reference's);
- metrics read back every N steps reach TensorBoard and the progress bar;
- train.precision mixed_bfloat16 / mixed_float16 keeps float32 variables;
- evaluation traces its step once, the last partial batch included.
"""
import numpy as np
import pytest
import tensorflow as tf
import keras

from ekg_tf.models import build_model
from ekg_tf.train.fused_bn import use_fused_batch_norm

ARCH = "resnet8"


def _pair(seed=0):
    keras.utils.set_random_seed(seed)
    a = build_model(ARCH, 10)
    b = keras.models.clone_model(a)
    b.set_weights(a.get_weights())
    rng = np.random.default_rng(seed)
    for layer in a.layers:  # not the initial statistics: make the inference check count
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape) * 0.1)
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
    b.set_weights(a.get_weights())
    return a, b


def test_fused_batch_norm_equals_keras():
    keras_model, fused = _pair()
    assert use_fused_batch_norm(fused) == sum(
        isinstance(l, keras.layers.BatchNormalization) for l in fused.layers) > 0
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 8)

    @tf.function
    def step(model):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True))
        return logits, tape.gradient(loss, model.trainable_variables)

    la, ga = step(keras_model)
    lb, gb = step(fused)
    np.testing.assert_allclose(lb, la, rtol=1e-4, atol=1e-5)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * float(tf.reduce_max(tf.abs(a))))
    for a, b in zip(keras_model.weights, fused.weights):  # moving statistics (biased variance)
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    np.testing.assert_allclose(fused(x, training=False), keras_model(x, training=False),
                               rtol=1e-4, atol=1e-5)
    assert "FusedBatchNormV3" in {op.type for op in
                                  step.get_concrete_function(fused).graph.get_operations()} \
        or any("FusedBatchNorm" in f.signature.name or any(
            "FusedBatchNorm" in n.op for n in f.node_def)
            for f in step.get_concrete_function(fused).graph.as_graph_def().library.function)


def test_fused_kernel_only_at_block_widths_on_a_cpu():
    """Training BN: the fused op at a block width, the compiled batch statistics below it
    (on a CPU), both equal to Keras': outputs, gradients, moving statistics."""
    from ekg_tf.graph.bn_kernels import CPU_CHANNEL_BLOCK, fast_fused_width
    assert fast_fused_width(32, on_gpu=False) and not fast_fused_width(13, on_gpu=False)
    assert fast_fused_width(13, on_gpu=True)
    # one BN at a block width, one below it: only the first runs the fused op
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(CPU_CHANNEL_BLOCK, 3, use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(7, 3, use_bias=False)(x))
    model = keras.Model(inputs, x)
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    assert use_fused_batch_norm(model) == 2
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    dy = np.random.default_rng(1).normal(size=(4, 4, 4, 7)).astype(np.float32)

    @tf.function
    def step(m):
        with tf.GradientTape() as tape:
            y = m(x, training=True)
        return y, tape.gradient(y, m.trainable_variables, output_gradients=dy)

    ops = [op.type for op in step.get_concrete_function(model).graph.get_operations()]
    on_gpu = bool(tf.config.list_logical_devices("GPU"))
    assert ops.count("FusedBatchNormV3") == (2 if on_gpu else 1)
    (y, grads), (y_ref, grads_ref) = step(model), step(reference)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    scale = max(float(np.abs(g).max()) for g in grads_ref)  # some are zero up to rounding
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale)
    for a, b in zip(model.non_trainable_weights, reference.non_trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=b.path)



@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("channels", [16, 7])  # the fused kernel, the compiled one
def test_batch_statistics_of_reduced_precision_input_are_float32(dtype, channels):
    """The memory bank's BN in mixed precision: bfloat16/float16 x with float32 gamma and
    beta gives float32 statistics equal to float32's and y in x's dtype, equal to the
    float32 result within x's rounding."""
    from ekg_tf.graph.bn_kernels import batch_statistics_norm
    rng = np.random.default_rng(3)
    x32 = tf.constant(rng.normal(1.0, 2.0, (16, 8, 8, channels)), tf.float32)
    gamma = tf.constant(rng.uniform(0.5, 1.5, channels), tf.float32)
    beta = tf.constant(rng.normal(size=channels), tf.float32)
    x = tf.cast(x32, dtype)
    y, mean, variance = batch_statistics_norm(x, gamma, beta, 1e-5)
    y_ref, mean_ref, variance_ref = batch_statistics_norm(tf.cast(x, tf.float32), gamma,
                                                          beta, 1e-5)
    assert y.dtype == x.dtype and mean.dtype == variance.dtype == tf.float32
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(variance, variance_ref, rtol=1e-5)
    step = 2.0 ** -(7 if dtype == "bfloat16" else 10)  # the dtype's relative precision
    np.testing.assert_allclose(tf.cast(y, tf.float32), y_ref, rtol=step, atol=step)


# ----------------------------------------------------------------- two views, one batch
def _ekg_batch(batch=8, views=2, teachers=3, seed=2):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, views, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    index = np.arange(batch, dtype=np.int64)
    logits = rng.normal(size=(batch, 10, teachers)).astype(np.float32) * 3
    return images, labels, index, logits


def _two_pass_loss(temperature):
    """The views as separate forward passes (the same loss of spec section 7 on top)."""
    from ekg_tf.finetune.distill import ekg_loss

    def loss_fn(model, batch, global_batch_size):
        images, labels, teachers = batch[0], tf.cast(batch[1], tf.int32), batch[-1]
        logits = tf.stack([model(images[:, v], training=True)
                           for v in range(images.shape[1])], axis=1)
        loss, _ = ekg_loss(logits, labels, teachers, temperature, global_batch_size)
        return loss, logits, labels
    return loss_fn


def _one_step(loss_fn, batch, freeze_bn):
    from ekg_tf import train
    from ekg_tf.config import base_config
    model, _ = _pair()
    if freeze_bn:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    strategy = tf.distribute.get_strategy()
    opt = train.make_optimizer(base_config().train, 100)
    trainer = train.Trainer(model, opt, strategy, len(batch[1]), 5e-4, loss_fn=loss_fn,
                            grad_scale=0.5, fused_batch_norm=True)
    before = [w.numpy().copy() for w in model.weights]
    out = trainer.train_step(tuple(tf.constant(b) for b in batch)).numpy()
    return model, before, [w.numpy() for w in model.weights], out


def test_two_views_in_one_batch_equal_two_passes():
    """One forward of the 2B batch (as the reference: [B, V, ...] reshaped to [B*V, ...])
    == the views as two passes, when BN normalises both alike (moving statistics: BN not
    trainable); the update is the same within float32 rounding (rtol 1e-4 of the move)."""
    from ekg_tf.finetune.distill import make_distillation_loss
    batch = _ekg_batch()
    _, w0, one, out1 = _one_step(make_distillation_loss(4.0), batch, freeze_bn=True)
    _, _, two, out2 = _one_step(_two_pass_loss(4.0), batch, freeze_bn=True)
    np.testing.assert_allclose(out1, out2, rtol=1e-5)
    moved = max(np.abs(a - b).max() for a, b in zip(w0, one))
    diff = max(np.abs(a - b).max() for a, b in zip(one, two))
    assert moved > 1e-3 and diff <= 1e-4 * moved, (moved, diff)


def test_two_view_batch_norm_uses_the_statistics_of_both_views():
    """BN training mode: the 2B batch's statistics (the reference's), one moving-average
    update per step: the first BN layer's moving mean moves to 0.9 m + 0.1 mean(2B)."""
    from ekg_tf.finetune.distill import make_distillation_loss
    batch = _ekg_batch()
    model, w0, _, _ = _one_step(make_distillation_loss(4.0), batch, freeze_bn=False)
    bn = next(l for l in model.layers if isinstance(l, keras.layers.BatchNormalization))
    pre = keras.Model(model.inputs, model.get_layer(bn.name).input)
    pre.set_weights([w for w, v in zip(w0, model.weights)
                     if any(v is u for u in pre.weights)])
    x = batch[0].reshape(-1, 32, 32, 3)
    joint = pre(x, training=False).numpy().reshape(-1, bn.moving_mean.shape[0]).mean(0)
    m0 = w0[[i for i, v in enumerate(model.weights) if v is bn.moving_mean][0]]
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.9 * m0 + 0.1 * joint,
                               rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------- metrics every N steps
def test_metrics_read_back_every_n_steps_reach_tensorboard_and_progress_bar(tmp_path, capsys):
    """fit reads the device-side sums every log_every (3) steps and at the end (7): the
    TensorBoard 'loss' is the mean of the per-step losses (as stepped one by one with a
    read-back each), the bar shows the last read-back's mean loss and counts 7 steps."""
    from ekg_tf import train
    from ekg_tf.config import base_config
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7 * 8, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 7 * 8)
    strategy = tf.distribute.get_strategy()

    def trainer():
        model, _ = _pair()
        return train.Trainer(model, train.make_optimizer(base_config().train, 7), strategy, 8,
                             5e-4, fused_batch_norm=True)

    def batches(start_epoch=0, skip=0):
        return strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(8).skip(skip))

    stepped = trainer()
    per_step = [float(stepped.train_step(b).numpy()[0]) for b in batches()]
    capsys.readouterr()
    fitted = trainer()
    train.fit(fitted, workdir=str(tmp_path), make_train_input=batches, steps_per_epoch=7,
              total_steps=7, log_every=3, checkpoint_every=100, name="t")
    assert fitted.train_step.experimental_get_tracing_count() == 1  # no retracing
    err = capsys.readouterr().err
    scalars = {}
    for path in tf.io.gfile.glob(str(tmp_path / "tensorboard" / "t" / "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                scalars.setdefault(v.tag, {})[event.step] = float(tf.make_ndarray(v.tensor))
    assert sorted(scalars["loss"]) == [3, 6, 7]
    np.testing.assert_allclose(scalars["loss"][3], np.mean(per_step[0:3]), rtol=1e-4)
    np.testing.assert_allclose(scalars["loss"][6], np.mean(per_step[3:6]), rtol=1e-4)
    np.testing.assert_allclose(scalars["loss"][7], per_step[6] / 3, rtol=1e-4)  # /log_every
    last = err.rsplit("\r", 1)[-1]
    assert "7/7" in last, last
    shown = float(last.split("loss=")[1].split()[0])
    np.testing.assert_allclose(shown, per_step[6], rtol=1e-3)


# ----------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_float32_variables(precision):
    """The step computes in bf16/f16 (its graph has Conv2D ops of that dtype) while every
    variable (weights, BN statistics, optimizer slots) stays float32; the step's loss is
    float32 and within 2% of float32's; evaluation/saving see float32 layers afterwards."""
    from ekg_tf import train
    from ekg_tf.config import base_config
    from ekg_tf.train.precision import wrap_optimizer
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    strategy = tf.distribute.get_strategy()
    losses = {}
    for p in ("float32", precision):
        model, _ = _pair()
        opt = wrap_optimizer(train.make_optimizer(base_config().train, 10), p)
        trainer = train.Trainer(model, opt, strategy, 8, 5e-4, fused_batch_norm=True,
                                precision=p)
        out = trainer.train_step((tf.constant(x), tf.constant(y)))
        assert out.dtype == tf.float32
        losses[p] = float(out.numpy()[0])
        assert int(opt.iterations.numpy()) == 1
    compute = {"mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}[precision]
    graph = trainer.train_step.get_concrete_function(
        (tf.TensorSpec(x.shape, tf.float32), tf.TensorSpec(y.shape, tf.int64))).graph
    graph_def = graph.as_graph_def()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    dtypes = {n.attr["T"].type for n in nodes if n.op.endswith("Conv2D")}
    assert compute.as_datatype_enum in dtypes, dtypes
    assert {v.dtype for v in model.weights} == {"float32"}
    assert all(v.dtype == "float32" for v in opt.variables if "iteration" not in v.path
               and v.dtype != "int64")
    np.testing.assert_allclose(losses[precision], losses["float32"], rtol=2e-2)
    assert {l.compute_dtype for l in model.layers} == {"float32"}
    assert model(x, training=False).dtype == "float32"


def test_evaluation_traces_once_and_counts_a_partial_last_batch():
    """evaluate() over batches of 4, 4 and 2 images: one trace of its step (the last,
    smaller batch reuses it), and the model's own top-1 and loss over all 10 images; the
    search's batch forward likewise traces once."""
    from ekg_tf.graph.gated import GatedModel
    from ekg_tf.subnet_search import evaluator
    from ekg_tf.train.evaluate import evaluate, make_eval_step
    model, _ = _pair(3)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 10)
    strategy = tf.distribute.get_strategy()
    step = make_eval_step(model, strategy)
    out = evaluate(model, strategy, lambda ctx: tf.data.Dataset.from_tensor_slices(
        (x, y)).batch(4), eval_step=step)
    assert step.experimental_get_tracing_count() == 1
    logits = model(x, training=False).numpy()
    assert out["examples"] == 10
    assert out["top1"] == pytest.approx(float(np.mean(logits.argmax(1) == y)))
    loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    assert out["loss"] == pytest.approx(float(np.mean(loss)), rel=1e-5)
    gated = GatedModel(model)
    batched = evaluator.batch_logits(gated, x, 4, training=False)
    np.testing.assert_allclose(batched, logits, atol=1e-5)
    assert evaluator._forward_fn(gated, False).experimental_get_tracing_count() == 1
