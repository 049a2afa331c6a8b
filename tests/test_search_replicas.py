"""The search on 1 and on 2 replicas (MirroredStrategy over 2 logical CPUs, in a
subprocess: the CPU split must happen before TensorFlow initialises): the evaluator's
scores, logits and candidate evaluations with both forwards (real width and masked),
and the adaptation pass's weights."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    from ekg_tf.distribute import split_cpu_devices
    split_cpu_devices(2)
    import numpy as np
    import tensorflow as tf
    from ekg_tf.graph.gated import GatedModel
    from ekg_tf.models import build_model
    from ekg_tf.subnet_search.adapt import adapt
    from ekg_tf.subnet_search.evaluator import SubnetEvaluator
    from ekg_tf.slimming import batch_norm_layers

    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 48)
    k = rng.normal(size=(48, 10)).astype(np.float32)
    single = GatedModel(build_model("resnet8", 10))
    for bn in batch_norm_layers(single):
        bn.gamma.assign(rng.uniform(0.5, 1.5, bn.gamma.shape).astype(np.float32))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        multi = GatedModel(build_model("resnet8", 10))
    initial = single.get_weights()
    multi.set_weights(initial)
    out = {}
    for name, model, strat in (("one", single, None), ("two", multi, strategy)):
        out[name] = {}
        for forward in ("sliced", "masked"):
            for g, seed in zip(model.gate_groups, range(100)):
                g.set_rank_from_score(np.random.default_rng(seed).random(g.channels))
                g.rate = 0.6
            ev = SubnetEvaluator(model, x, y, 32, strategy=strat, forward=forward)
            scores, logits = ev.score(k)
            ev.refresh()
            model.gate_group("block1_0_conv1").rate = 0.3
            cand = ev.evaluate("block1_0_conv1")
            out[name][forward] = {"replicas": ev.num_replicas, "logits": logits.tolist(),
                                  "cand": cand.tolist(),
                                  "scores": {n: s.tolist() for n, s in scores.items()}}
        for g in model.gate_groups:
            g.rate = 1.0
        info = adapt(model, x, y, batch_size=16, strategy=strat or tf.distribute.get_strategy())
        out[name]["adapt_loss"] = info["loss"]
        out[name]["adapted"] = [w.tolist() for w in model.get_weights()]
    print(json.dumps(out))
""")


def test_search_identical_with_one_and_two_replicas():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          cwd=root, timeout=600, env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for forward in ("sliced", "masked"):
        one, two = out["one"][forward], out["two"][forward]
        assert (one["replicas"], two["replicas"]) == (1, 2)
        # sync BN: 2 replicas of 16 images see the statistics of the whole 32-image batch
        np.testing.assert_allclose(two["logits"], one["logits"], atol=1e-4)
        np.testing.assert_allclose(two["cand"], one["cand"], atol=1e-4)
        for name, s1 in one["scores"].items():
            s1, s2 = np.array(s1), np.array(two["scores"][name])
            # Taylor scores |sum(dL/dy * y)| nearly cancel under batch-statistics BN (it is
            # almost invariant to a channel's scale), so float32 reassociation across
            # replicas shows up at up to ~1% of the largest score: compare at 2% of it.
            np.testing.assert_allclose(s2, s1, rtol=0, atol=2e-2 * s1.max() + 1e-9)
    # The adaptation pass (3 steps of 16 images, 8 per replica): same weights.
    assert abs(out["two"]["adapt_loss"] - out["one"]["adapt_loss"]) < 1e-5
    for w1, w2 in zip(out["one"]["adapted"], out["two"]["adapted"]):
        np.testing.assert_allclose(np.array(w2), np.array(w1), rtol=1e-4, atol=1e-5)
