"""The ekg-train / ekg-eval command lines: real-data evidence and bad inputs, in subprocesses."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def run_cli(module, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in out.stdout.strip().splitlines() if line.strip()]
    result = json.loads(lines[-1]) if lines else None
    return out.returncode, result, out.stderr


def test_eval_of_published_resnet56_reports_published_accuracy(reference_npz, cifar_test1000):
    code, result, err = run_cli(
        "ekg_tf.cli.eval", "--config=configs/cifar10_resnet56.py",
        f"--config.model.init={reference_npz}", "--config.data.source=npz",
        f"--config.data.test_path={cifar_test1000}", "--bn_mode=both")
    assert code == 0, err[-2000:]
    assert abs(result["top1"] - 0.934) <= 0.003  # reference: 93.40% (BN inference mode)
    assert result["batch_stats"]["top1"] >= 0.925  # reference: 93.50% (batch statistics)
    assert result["examples"] == 1000 and 850_000 <= result["params"] <= 860_000
    assert abs(result["macs"] - 125e6) / 125e6 < 0.01


@pytest.mark.parametrize("args,message", [
    (["--config.model.arch=resnet57"], "unknown architecture 'resnet57'"),
    (["--config.data.test_path=/no/such/test.npz"], "data.test_path '/no/such/test.npz' does not exist"),
    (["--config.model.arch=resnet20"], "another architecture"),
])
def test_eval_bad_inputs_are_clear_errors(reference_npz, cifar_test1000, args, message):
    base = ["--config=configs/cifar10_resnet56.py", f"--config.model.init={reference_npz}",
            "--config.data.source=npz", f"--config.data.test_path={cifar_test1000}"]
    code, result, err = run_cli("ekg_tf.cli.eval", *base, *args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert result["status"] == "error" and message in result["error"]


@pytest.mark.parametrize("args,message", [
    (["--config.data.eval_batch_size=0"], "data.eval_batch_size must be an integer > 0, got 0"),
    (["--config.data.batch_sze=8"], "unknown config key 'batch_sze' in --config.data.batch_sze; "
                                    "did you mean 'batch_size'?"),
])
def test_bad_config_values_are_clear_errors(args, message):
    code, result, err = run_cli("ekg_tf.cli.eval", "--config=configs/synthetic.py",
                                "--config.model.init=unused.npz", *args)
    assert code == 2 and message in err and "Traceback" not in err, err[-2000:]
    assert result == {"status": "error", "error": message}


def test_only_the_project_error_is_a_one_line_error(capsys):
    """UserError: one line + exit 2; an internal ValueError/KeyError keeps its traceback."""
    from ekg_tf.utils.cli import UserError, run_main

    def fails_with(error):
        def main(argv):
            raise error
        return run_main(main)

    with pytest.raises(SystemExit) as stop:
        fails_with(UserError("set data.train_path"))([])
    assert stop.value.code == 2 and "error: set data.train_path" in capsys.readouterr().err
    for internal in (ValueError("bug"), KeyError("bug")):
        with pytest.raises(type(internal)):
            fails_with(internal)([])


def test_eval_tfds_without_network_explains_alternatives(tmp_path, reference_npz):
    from test_data import _network_available
    if _network_available():
        pytest.skip("this machine has network access")
    code, result, err = run_cli(
        "ekg_tf.cli.eval", "--config=configs/cifar10_resnet56.py",
        f"--config.model.init={reference_npz}", "--config.data.source=tfds",
        f"--config.data.tfds_data_dir={tmp_path}")
    assert code == 2 and "Traceback" not in err
    assert "--config.data.source=npz" in err and "tfds_manual_dir" in err


_BEFORE_TF = """
import json, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as e:
    print(json.dumps({"code": e.code, "tensorflow": "tensorflow" in sys.modules}))
"""


@pytest.mark.parametrize("module,args,message", [
    ("ekg_tf.export.cli", ["--config=configs/quickstart.py", "--formats=tensorrt"],
     "unknown export format"),
    ("ekg_tf.export.cli", ["--config=configs/quickstart.py"], "no search result"),
    ("ekg_tf.cli.qat", ["--config=configs/cifar10_resnet56.py"], "no search result"),
    ("ekg_tf.cli.eval", ["--config=configs/synthetic.py"], "nothing to evaluate"),
])
def test_bad_input_is_refused_before_tensorflow_loads(tmp_path, module, args, message):
    """A bad flag or a missing input costs a user a fraction of a second, not an import of
    TensorFlow (and the same one-line error as later checks give)."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", _BEFORE_TF, module, *args,
                          f"--workdir={tmp_path}"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120, env=env)
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"code": 2, "tensorflow": False}, out.stderr[-2000:]
    assert message in json.loads(lines[-2])["error"] and "Traceback" not in out.stderr
