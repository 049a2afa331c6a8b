"""Prune, then quantize: quantization-aware training (tfmot) of a pruned network.

Caller side (Keras 3; imports neither tfmot nor tf-keras): `ekg_tf.qat.pipeline`
(`run_qat` = the ekg-qat job, `quantize_aware` = the Python API) and `ekg_tf.qat.job`.
Worker side (a process of its own, tf-keras + tfmot): `ekg_tf.qat.worker`,
`ekg_tf.qat.convert` (Keras 3 -> tf-keras), `ekg_tf.qat.quantize` (the QAT model).
"""


def quantize_aware(*args, **kwargs):
    """See `ekg_tf.qat.pipeline.quantize_aware`."""
    from ekg_tf.qat.pipeline import quantize_aware as run
    return run(*args, **kwargs)


def run_qat(*args, **kwargs):
    """See `ekg_tf.qat.pipeline.run_qat`."""
    from ekg_tf.qat.pipeline import run_qat as run
    return run(*args, **kwargs)
