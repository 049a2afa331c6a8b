"""ekg-prune: the stages (train, search, finetune, export) in one workdir, and its report."""


def run_pipeline(config, workdir, **kwargs):
    """See `ekg_tf.pipeline.runner.run_pipeline` (imported lazily: it pulls in TensorFlow)."""
    from ekg_tf.pipeline.runner import run_pipeline as run
    return run(config, workdir, **kwargs)
