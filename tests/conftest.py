"""Shared test fixtures: where ../shared is, and skipping when it is absent."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# With N pytest-xdist workers on N cores, TensorFlow's default of one intra-op thread per
# core in every worker (and in the subprocesses tests start) oversubscribes the machine:
# one thread each: the whole suite in 447 s instead of 571 s on 2 cores (clean-clone CI,
# quiet machine, with two smaller test trims of the same commit).
# Results do not depend on it; set TF_NUM_INTRAOP_THREADS to override.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

import pytest  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
REFERENCE_NPZ = os.path.join(SHARED, "reference", "res56_cifar10.npz")
CIFAR_TRAIN = os.path.join(SHARED, "data", "cifar10", "cifar10_train.npz")
CIFAR_TEST = os.path.join(SHARED, "data", "cifar10", "cifar10_test.npz")
CIFAR_TEST1000 = os.path.join(SHARED, "data", "cifar10", "cifar10_test1000_lossless.npz")


def require(path):
    if not os.path.exists(path):
        pytest.skip(f"real data not available: {path} is missing (../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def reference_npz():
    return require(REFERENCE_NPZ)


@pytest.fixture(scope="session")
def cifar_test1000():
    return require(CIFAR_TEST1000)


@pytest.fixture(scope="session")
def cifar_train():
    return require(CIFAR_TRAIN)


@pytest.fixture(scope="session")
def searched_resnet56(tmp_path_factory):
    """The published ResNet-56 after a real EKG search to 0.45 MACs on real CIFAR-10.

    The search code and objective are the product's (`run_search`, Taylor scores
    through the gates, the EKG objective); only its cost is cut so that the suite
    stays within budget: 3 validation (training) images per class instead of 32,
    a coarse step of 0.4 instead of 0.2, no adaptation pass, no memory bank.
    About 45 steps, 110 s alone on one thread (137 s with 5 images per class: the
    same MACs ratio and test top-1 within a point). Returns (config, workdir, result).
    Under pytest-xdist the workers of one session share it: the first one searches,
    the others wait for its result.json.
    """
    import fcntl
    import json
    for path in (REFERENCE_NPZ, CIFAR_TRAIN, CIFAR_TEST1000):
        require(path)
    from ekg_tf.config import reference_cifar_config
    from ekg_tf.subnet_search.pipeline import run_search
    config = reference_cifar_config("resnet56", "cifar10")
    config.model.init = REFERENCE_NPZ
    config.data.train_path = CIFAR_TRAIN
    config.data.test_path = CIFAR_TEST1000
    config.data.val_per_class = 3
    config.search.batch_size = 50
    config.search.search_step = 0.4
    config.search.adapt = False
    config.search.build_memory_bank = False
    config.search.bn_recalibration_images = 1024
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's directory, shared by its workers
    workdir = root / "resnet56_search"
    result_path = workdir / "search" / "result.json"
    with open(root / "resnet56_search.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if result_path.exists():
            with open(result_path) as f:
                result = json.load(f)
        else:
            result = run_search(config, str(workdir), log=lambda msg: None)
    return config, str(workdir), result
