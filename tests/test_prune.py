"""ekg-prune end to end on a tiny synthetic config, in subprocesses as a user runs it:
- an uninterrupted run: last JSON line, report, stage records;
- SIGKILLed during each stage (train, search, finetune, export) and started again with
  the same command: the same sub-network, fine-tuned weights and artifacts as the
  uninterrupted run, one export version, no temporary file left;
- a changed config for a done stage is refused, naming the key; --overwrite redoes it;
- two MultiWorkerMirroredStrategy workers on localhost (TF_CONFIG): the same sub-network
  and fine-tuned weights as one device, and only the chief writes the workdir."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT

TINY = ["--config=configs/synthetic.py",
        "--config.data.synthetic_train_size=192", "--config.data.synthetic_test_size=64",
        "--config.data.batch_size=32", "--config.data.eval_batch_size=64",
        "--config.data.val_per_class=4", "--config.data.adapt_per_class=4",
        "--config.train.steps=12", "--config.train.checkpoint_every_steps=3",
        "--config.train.log_every_steps=3",
        "--config.search.adapt_batch_size=40", "--config.search.batch_size=40",
        "--config.search.target_ratio=0.93", "--config.search.num_teachers=2",
        "--config.search.bn_recalibration_images=64", "--config.search.cache_prefix=False",
        "--config.search.memory_bank_shard_size=100",
        "--config.finetune.steps=12", "--config.finetune.batch_size=32",
        "--config.finetune.bn_recalibration_images=64",
        "--config.export.formats=tflite", "--config.export.quantize=none",
        "--config.export.latency_runs=2", "--config.export.dense_latency=False",
        "--config.export.verify_images=64"]


def prune(workdir, *args, env=None):
    env = dict(env or os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, "-m", "ekg_tf.cli.prune", *TINY,
                             f"--workdir={workdir}", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.strip()]
    return proc.returncode, (json.loads(lines[-1]) if lines else None), err


def files(workdir):
    """Relative paths of every file, without TensorBoard event files and the lock (a
    killed run's events stay beside the re-run's; both are valid logs)."""
    out = set()
    for root, _, names in os.walk(workdir):
        for name in names:
            if name.startswith("events.out.tfevents") or name == ".lock":
                continue
            out.add(os.path.relpath(os.path.join(root, name), workdir))
    return out


def temporaries(workdir):
    from ekg_tf.utils.io import is_temporary
    return [os.path.join(root, n) for root, dirs, names in os.walk(workdir)
            for n in dirs + names if is_temporary(n)]


def last_weights(workdir):
    import keras
    model = keras.models.load_model(os.path.join(workdir, "finetune", "last.keras"),
                                    compile=False, safe_mode=True)
    return [w.numpy() for w in model.weights]


def subnet(workdir):
    with open(os.path.join(workdir, "search", "subnet.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    code, result, err = finish(prune(workdir))
    assert code == 0, err[-3000:]
    return workdir, result


def test_one_command_one_report(uninterrupted):
    workdir, result = uninterrupted
    assert result["status"] == "done"
    assert 0.0 <= result["baseline_top1"] <= 1.0 and 0.0 <= result["pruned_top1"] <= 1.0
    assert 0.0 < result["macs_ratio"] <= 0.93 and 0.0 < result["params_ratio"] < 1.0
    assert result["exports"] == {"keras": "ok", "keras_folded": "ok", "tflite_float32": "ok"}
    assert list(result["stages"]) == ["train", "search", "finetune", "export"]
    assert all(s["status"] == "done" for s in result["stages"].values())
    report = (workdir / "report.md").read_text()
    for section in ("test top-1", "Kept width per gate group", "Search trajectory",
                    "Fine-tuning", "Export verification", "Seconds per stage",
                    "git revision", "## Config"):
        assert section in report, section
    for png in ("report_accuracy_vs_macs.png", "search/kept_width.png",
                "finetune/accuracy_per_epoch.png"):
        assert f"]({png})" in report and (workdir / png).stat().st_size > 0, png
    data = json.loads((workdir / "report.json").read_text())
    assert data["macs_ratio"] == pytest.approx(result["macs_ratio"])
    assert data["config"]["search"]["target_ratio"] == 0.93
    assert os.listdir(workdir / "tensorboard" / "report")
    assert not temporaries(workdir)
    # the train stage's weights are what ekg-eval reads back (the train stage's own number)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-m", "ekg_tf.cli.eval", *TINY[:3],
                          f"--config.model.init={workdir / 'train' / 'model.weights.h5'}"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    trained = json.loads((workdir / "stages" / "train.json").read_text())["result"]
    assert json.loads(out.stdout.splitlines()[-1])["top1"] == pytest.approx(trained["top1"],
                                                                          abs=1e-6)


def _kill_when(proc, ready, what, timeout=600):
    start = time.time()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"ekg-prune ended before {what}: {proc.stderr.read()[-3000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def test_sigkill_in_every_stage_then_rerun_equals_uninterrupted(uninterrupted, tmp_path):
    full_dir, full = uninterrupted
    wd = tmp_path / "killed"

    def record(stage):
        path = wd / "stages" / f"{stage}.json"
        return json.loads(path.read_text())["status"] if path.exists() else None

    kill_points = {
        "train": lambda: (wd / "train" / "checkpoints" / "checkpoint").exists(),
        "search": lambda: record("search") == "running" and (wd / "search" / "history.json").exists(),
        "finetune": lambda: (wd / "finetune" / "checkpoints" / "checkpoint").exists(),
        # the case: a half-filled artifacts/1/ with the TFLite build folder
        "export": lambda: any(n.startswith(".edge-") for n in
                              os.listdir(wd / "export" / "artifacts" / "1"))
        if (wd / "export" / "artifacts" / "1").exists() else False,
    }
    for stage, ready in kill_points.items():
        proc = prune(wd)
        _kill_when(proc, ready, f"the {stage} stage's progress")
        assert record(stage) == "running", stage  # killed inside that stage
    code, result, err = finish(prune(wd))
    assert code == 0, err[-3000:]
    assert "skipped" in err and "temporary file" in err  # done stages skipped, leftovers removed
    assert subnet(wd) == subnet(full_dir)
    for a, b in zip(last_weights(wd), last_weights(full_dir)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert result["exports"] == full["exports"] and result["macs_ratio"] == full["macs_ratio"]
    assert result["pruned_top1"] == pytest.approx(full["pruned_top1"], abs=1e-6)
    assert os.listdir(wd / "export" / "artifacts") == ["1"]  # the killed version, finished
    assert files(wd) == files(full_dir)
    assert not temporaries(wd)


def test_changed_config_is_refused_unless_overwritten(uninterrupted, tmp_path):
    import shutil
    full_dir, _ = uninterrupted
    wd = tmp_path / "copy"
    shutil.copytree(full_dir, wd)
    code, result, err = finish(prune(wd, "--config.export.latency_runs=3"))
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert "export stage" in result["error"] and "export.latency_runs: 2 -> 3" in result["error"]
    assert "--overwrite=export" in result["error"]
    code, result, err = finish(prune(wd, "--config.export.latency_runs=3", "--overwrite=export"))
    assert code == 0, err[-3000:]
    assert result["exports"]["tflite_float32"] == "ok"
    assert "train: done before, skipped" in err and "finetune: done before, skipped" in err


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_workers_equal_one_device_and_only_the_chief_writes(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    wd = tmp_path / "two_workers"
    cluster = {"worker": [f"localhost:{p}" for p in _free_ports(2)]}
    procs = [prune(wd, env=dict(os.environ, TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": i}}))) for i in range(2)]
    results = [finish(p, timeout=900) for p in procs]
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert results[1][1]["worker"] == "non-chief"
    assert subnet(wd) == subnet(full_dir)
    moved = max(np.abs(w).max() for w in last_weights(full_dir))
    for a, b in zip(last_weights(wd), last_weights(full_dir)):
        # all-reduced sums vs one device's: rounding only
        np.testing.assert_allclose(a, b, atol=1e-4 * moved)
    assert files(wd) == files(full_dir)  # nothing from the second worker in the workdir
