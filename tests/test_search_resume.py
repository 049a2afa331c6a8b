"""End-to-end search on ResNet-20 / synthetic data: a run interrupted after N steps and
started again with the same settings ends with the same sub-network as an uninterrupted
run; outputs, memory bank and bad-input errors."""
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from ekg_tf.config import base_config
from ekg_tf.flops import ComplexityCounter
from ekg_tf.graph.gated import GatedModel
from ekg_tf.models import build_model
from ekg_tf.subnet_search.evaluator import SubnetEvaluator
from ekg_tf.subnet_search.memory_bank import MemoryBank
from ekg_tf.subnet_search.pipeline import run_search
from ekg_tf.subnet_search.search import EKGSearch, SearchSettings


def small_config():
    c = base_config()
    c.model.arch = "resnet20"
    c.data.source = "synthetic"
    c.data.name = "synthetic"
    c.data.synthetic_train_size = 240
    c.data.synthetic_test_size = 64
    c.data.val_per_class = 6            # 60 validation images
    c.data.adapt_per_class = 4          # 40 images: one adaptation step
    c.data.eval_batch_size = 64
    c.search.adapt_batch_size = 40
    c.search.batch_size = 32            # two BN batches (32 + 28)
    c.search.target_ratio = 0.93
    c.search.num_teachers = 3
    c.search.bn_recalibration_images = 128
    c.search.memory_bank_shard_size = 100
    c.search.cache_prefix = False       # fewer traces; the cache is tested in test_search_evaluator
    return c


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    result = run_search(small_config(), workdir, log=lambda m: None)
    return workdir, result


def _history(workdir):
    with open(os.path.join(workdir, "search", "history.json")) as f:
        return json.load(f)


def test_uninterrupted_run_outputs(uninterrupted):
    workdir, r = uninterrupted
    assert r["status"] == "done" and r["flops_ratio"] <= 0.93 and r["steps"] >= 3
    assert r["retraces_after_warmup"] == 0
    for key in ("params_ratio", "search_seconds", "val_loss", "val_top1",
                "test_top1_bn_train_mode", "test_top1_bn_recalibrated",
                "memory_bank_bytes_per_image"):
        assert key in r
    for name in ("subnet.json", "history.json", "macs_ratio.png", "objective.png",
                 "kept_width.png", "weights.weights.h5"):
        assert os.path.exists(os.path.join(workdir, "search", name)), name
    assert os.listdir(os.path.join(workdir, "search", "tb"))
    spec = json.load(open(os.path.join(workdir, "search", "subnet.json")))
    h = _history(workdir)["history"]
    assert h[0]["macs_ratio"] == 1.0 and h[-1]["macs_ratio"] <= 0.93 < h[-2]["macs_ratio"]
    for name, g in spec["groups"].items():
        assert g["rate"] == h[-1]["rates"][name]
        assert len(g["kept_indices"]) == g["kept"]
    # memory bank: teachers from the history without the final step, teacher 0 = lowest loss
    bank = MemoryBank.open(os.path.join(workdir, "memory_bank"))
    assert (bank.num_examples, bank.num_classes, bank.num_teachers) == (240, 10, 3)
    steps = [t["step"] for t in bank.meta["teachers"]]
    losses = {e["step"]: e["loss"] for e in h[:-1]}
    assert h[-1]["step"] not in steps
    assert losses[steps[0]] == min(losses.values())
    assert r["memory_bank_bytes_per_image"] == 10 * 3 * 2


def test_complete_memory_bank_is_reused(uninterrupted, tmp_path):
    """A finished search started again rebuilds nothing: the bank is reused when its
    teachers, size and precision match ("" is float32, as the config's default)."""
    import shutil
    full_dir, _ = uninterrupted
    workdir = str(tmp_path / "again")
    shutil.copytree(full_dir, workdir)
    before = os.path.getmtime(os.path.join(workdir, "memory_bank", "meta.json"))
    c = small_config()
    c.search.memory_bank_precision = ""
    logs = []
    run_search(c, workdir, log=logs.append)
    assert any("memory bank" in m and "reusing it" in m for m in logs), logs
    assert os.path.getmtime(os.path.join(workdir, "memory_bank", "meta.json")) == before


def test_resume_after_interruption_equals_uninterrupted(uninterrupted, tmp_path):
    """Stopped by an exception right after step 2 was written (a crash), then started
    again with the same settings: it continues from step 2 and ends identically."""
    full_dir, full = uninterrupted
    workdir = str(tmp_path)
    c = small_config()
    c.search.build_memory_bank = False
    c.search.bn_recalibration_images = 0

    def crash_after_two(entry):
        if entry["step"] == 2:
            raise Stop()

    with pytest.raises(Stop):
        run_search(c, workdir, log=lambda m: None, on_step=crash_after_two)
    assert _history(workdir)["step"] == 2
    resumed = run_search(c, workdir, log=lambda m: None)
    a, b = _history(full_dir)["history"], _history(workdir)["history"]
    assert len(a) == len(b) and resumed["status"] == "done"
    for ea, eb in zip(a, b):
        assert ea["group"] == eb["group"] and ea["rates"] == eb["rates"]
        assert ea["ranks"] == eb["ranks"]
        np.testing.assert_allclose(ea["objective"], eb["objective"], rtol=1e-6)
    assert json.load(open(os.path.join(full_dir, "search", "subnet.json"))) == \
        json.load(open(os.path.join(workdir, "search", "subnet.json")))
    assert resumed["flops_ratio"] == full["flops_ratio"]


def test_workdir_of_another_model(uninterrupted):
    workdir, _ = uninterrupted
    c = small_config()
    c.model.arch = "resnet32"
    with pytest.raises(ValueError, match="holds a search of another run.*arch"):
        run_search(c, workdir, log=lambda m: None)


def test_empty_validation_set(tmp_path):
    c = small_config()
    c.data.val_per_class = 0
    with pytest.raises(ValueError, match="validation set is empty"):
        run_search(c, str(tmp_path), log=lambda m: None)


def test_unreachable_target(tmp_path):
    model = GatedModel(build_model("resnet20", 10))
    counter = ComplexityCounter(model)
    floor = counter.macs_ratio({g.name: 0.0 for g in model.gate_groups})
    x = np.zeros((20, 32, 32, 3), np.float32)
    ev = SubnetEvaluator(model, x, np.zeros(20), 20)
    search = EKGSearch(model, ev, SearchSettings(target_ratio=floor / 2), str(tmp_path), {})
    with pytest.raises(ValueError, match="unreachable.*minimum width"):
        search.run()
