"""Every Python example of docs/api.md runs as written (in order, one namespace), on real
CIFAR-10 images from ../shared, and does what the text says."""
import os
import re

import pytest

from conftest import CIFAR_TRAIN, REPO_ROOT, require

DOC = os.path.join(REPO_ROOT, "docs", "api.md")


def blocks() -> list:
    with open(DOC) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_the_doc_has_examples():
    assert len(blocks()) >= 6


def test_api_examples_run(monkeypatch, tmp_path):
    require(CIFAR_TRAIN)
    monkeypatch.chdir(REPO_ROOT)  # the examples read ../shared relative to the repository
    namespace = {}
    for i, code in enumerate(blocks()):
        try:
            exec(compile(code, f"docs/api.md block {i}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"docs/api.md block {i} failed: {type(e).__name__}: {e}\n{code}")
    model, result, report = namespace["model"], namespace["result"], namespace["report"]
    # prune: a smaller plain Keras model at the MACs target
    assert result.metrics["macs_ratio"] <= 0.5
    assert result.model.count_params() < model.count_params()
    assert report["status"] == "ok"
    assert {a["name"] for a in report["artifacts"]} >= {"saved_model", "tflite_float32",
                                                        "tflite_float16", "onnx"}
    assert namespace["half"].get_layer("block_3_expand").filters == 24
    assert namespace["found"].macs_ratio <= 0.5
