"""Shared test fixtures: where ../shared is, and skipping when it is absent."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
