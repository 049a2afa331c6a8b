from setuptools import find_packages, setup


def _requirements(path):
    return [line.strip() for line in open(path)
            if line.strip() and not line.startswith(("#", "-"))]


setup(
    name="ekg_tf",
    version="0.2.0",
    description="EKG filter pruning (ECCV 2022) for TensorFlow 2 / Keras 3, with deployment export",
    # export/ stays at the top of the repository but installs as ekg_tf.export.
    packages=find_packages(include=["ekg_tf", "ekg_tf.*"]) + ["ekg_tf.export"],
    package_dir={"ekg_tf.export": "export"},
    python_requires=">=3.10",
    install_requires=_requirements("requirements.txt"),
    extras_require={"qat": _requirements("requirements-qat.txt")},
    entry_points={"console_scripts": [
        "ekg-train=ekg_tf.cli.train:run",
        "ekg-eval=ekg_tf.cli.eval:run",
        "ekg-search=ekg_tf.cli.search:run",
        "ekg-finetune=ekg_tf.cli.finetune:run",
        "ekg-export=ekg_tf.export.cli:run",
        "ekg-prune=ekg_tf.cli.prune:run",
        "ekg-qat=ekg_tf.cli.qat:run",
    ]},
)
