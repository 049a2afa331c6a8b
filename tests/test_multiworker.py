"""MultiWorkerMirroredStrategy: two worker processes on localhost (TF_CONFIG) take one step
on a global batch of 16 and end with the weights one device gets from the same batch."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import tensorflow as tf

from conftest import REPO_ROOT, TESTS_DIR
from one_training_step import one_training_step

_WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    from ekg_tf.distribute import make_strategy
    strategy = make_strategy("mirrored")  # TF_CONFIG is set: MultiWorkerMirroredStrategy
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), type(strategy)
    from ekg_tf.train.loop import is_chief
    from one_training_step import one_training_step
    _, weights = one_training_step(strategy)
    if is_chief(strategy):
        np.savez(sys.argv[1], *weights)
""")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_workers_equal_one_device(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    out = tmp_path / "weights.npz"
    procs = []
    for index in range(2):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, TESTS_DIR]),
                   TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps({"cluster": cluster,
                                         "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(out)], cwd=REPO_ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]

    before, weights = one_training_step(tf.distribute.OneDeviceStrategy("/cpu:0"))
    with np.load(out) as f:
        workers = [f[f"arr_{i}"] for i in range(len(f.files))]
    moved = max(np.abs(a - b).max() for a, b in zip(weights, before))
    diff = max(np.abs(a - b).max() for a, b in zip(weights, workers))
    # float32: all-reduced sums vs one device's two-pass moments differ by rounding only
    assert moved > 1e-2 and diff < 1e-4 and diff / moved < 2e-4, (moved, diff)
