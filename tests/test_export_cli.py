"""ekg-export CLI: bad inputs give one clear error line and exit 2; a run on the quickstart
config (synthetic ResNet-8, a random sub-network written as workdir/search/subnet.json)
ends with one JSON line and writes the report."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

QUICKSTART = os.path.join(REPO, "configs", "synthetic.py")


def cli(workdir, *args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, "-m", "ekg_tf.export.cli", f"--config={QUICKSTART}",
                             f"--workdir={workdir}", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def finish(proc):
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir with a search result and gated weights (random init, random sub-network)."""
    from ekg_tf.graph.gated import GatedModel
    from ekg_tf.models import build_model
    from random_subnets import random_subnet
    wd = tmp_path_factory.mktemp("cli_workdir")
    model = GatedModel(build_model("resnet8", 10))
    rng = np.random.default_rng(0)
    random_subnet(model, rng, min_rate=0.3).to_json(str(wd / "search" / "subnet.json"))
    model.base.save_weights(str(wd / "init.weights.h5"))
    return wd


def test_bad_inputs(workdir, tmp_path):
    weights = f"--weights={workdir / 'init.weights.h5'}"
    cases = {  # what is wrong -> (args, workdir, expected message)
        "no search result": ((weights,), tmp_path / "empty", "no search result"),
        "unknown format": ((weights, "--formats=saved_model,tensorrt"), workdir,
                           "unknown export format"),
        "unknown quantization": ((weights, "--quantize=none,int4"), workdir,
                                 "unknown quantization mode"),
        "missing representative data": ((weights, "--formats=tflite", "--quantize=int8",
                                         f"--representative_data={tmp_path / 'nope.npz'}"),
                                        workdir, "does not exist"),
    }
    # Two at a time: each is a fresh interpreter importing TensorFlow.
    results = {}
    names = list(cases)
    for i in range(0, len(names), 2):
        procs = {n: cli(cases[n][1], *cases[n][0]) for n in names[i:i + 2]}
        results.update({n: finish(p) for n, p in procs.items()})
    for name, (code, out, err) in results.items():
        expected = cases[name][2]
        assert code == 2, (name, code, err[-2000:])
        assert expected in err, (name, err[-2000:])
        assert "Traceback" not in err, (name, err[-2000:])
        last = json.loads(out.strip().splitlines()[-1])
        assert last["status"] == "error" and expected in last["error"]
    assert not (workdir / "export").exists()  # nothing written on bad input


def test_cli_run(workdir):
    code, out, err = finish(cli(workdir, f"--weights={workdir / 'init.weights.h5'}",
                                "--formats=tflite", "--quantize=none,dynamic",
                                "--config.export.latency_runs=2",
                                "--config.export.dense_latency=False"))
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == "ok" and result["version"] == 1
    assert set(result["artifacts"]) == {"keras", "keras_folded", "tflite_float32",
                                        "tflite_dynamic"}
    for name, a in result["artifacts"].items():
        assert a["status"] == "ok" and a["size_bytes"] > 0, (name, a)
        assert set(a["latency_ms"]) == {"batch1", "batch32"}
    assert result["artifacts"]["tflite_float32"]["max_abs_diff"] < 1e-4
    assert "BN statistics re-estimated" in err  # not fine-tuned: re-estimated first
    art = workdir / "export" / "artifacts" / "1"
    report = json.loads((art / "export_report.json").read_text())
    assert report["bn_recalibrated"] is True and report["fine_tuned"] is False
    assert "| tflite_float32 | ok |" in (art / "export_report.md").read_text()
    assert (art / "latency.png").exists()
    assert (art / "model_float32.tflite").exists() and (art / "model.keras").exists()


def test_cli_fine_tuned_model_is_timed_against_the_dense_network(workdir, tmp_path):
    """A fine-tuned slim .keras (workdir/finetune/best.keras) is exported as is, and the
    unpruned architecture is timed beside it (the pruned/dense latency table)."""
    import shutil
    from ekg_tf.graph.gated import GatedModel
    from ekg_tf.models import build_model
    from ekg_tf.slimming import slim_model
    from ekg_tf.subnet import SubnetSpec
    wd = tmp_path / "fine_tuned"
    shutil.copytree(workdir / "search", wd / "search")
    model = GatedModel(build_model("resnet8", 10))
    model.base.load_weights(str(workdir / "init.weights.h5"))
    os.makedirs(wd / "finetune")
    slim_model(model, SubnetSpec.from_json(str(wd / "search" / "subnet.json"))).save(
        str(wd / "finetune" / "best.keras"))
    code, out, err = finish(cli(wd, "--formats=tflite", "--quantize=none",
                                "--config.export.latency_runs=2"))
    assert code == 0, err[-3000:]
    assert "fine-tuned: True" in err and "re-estimated" not in err
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["dense_latency_ms"]) == {"keras", "tflite_float32"}
    for timings in result["dense_latency_ms"].values():
        assert set(timings) == {"batch1", "batch32"} and min(timings.values()) > 0
