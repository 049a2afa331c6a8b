"""EKG fine-tuning: distillation loss from the memory bank, runner of the slimmed network."""
from ekg_tf.finetune.distill import (ekg_loss, kld, make_distillation_loss, selection_sums,
                                     student_logits, teacher_mask, distillation_target)

__all__ = ["distillation_target", "ekg_loss", "kld", "make_distillation_loss", "run_finetune",
           "selection_sums", "student_logits", "teacher_mask"]


def run_finetune(config, workdir, **kwargs):
    """See `ekg_tf.finetune.runner.run_finetune` (imported lazily: it pulls in the data stack)."""
    from ekg_tf.finetune.runner import run_finetune as run
    return run(config, workdir, **kwargs)
