from setuptools import find_packages, setup

setup(
    name="ekg_tf",
    version="0.2.0",
    description="EKG filter pruning (ECCV 2022) for TensorFlow 2 / Keras 3, with deployment export",
    packages=find_packages(include=["ekg_tf", "ekg_tf.*", "export", "export.*"]),
    python_requires=">=3.10",
    install_requires=[line.strip() for line in open("requirements.txt")
                      if line.strip() and not line.startswith("#")],
    entry_points={"console_scripts": [
        "ekg-train=ekg_tf.cli.train:run",
        "ekg-eval=ekg_tf.cli.eval:run",
        "ekg-search=ekg_tf.cli.search:run",
        "ekg-finetune=ekg_tf.cli.finetune:run",
        "ekg-export=export.cli:run",
        "ekg-qat=ekg_tf.cli.qat:run",
    ]},
)
