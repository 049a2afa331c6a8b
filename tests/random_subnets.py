"""Random states for the equivalence tests (gated == slimmed, counted == built, ...):
non-trivial BN parameters and statistics (fresh ones are 0/1 and hide slicing mistakes)
and random sub-networks (a random channel order and kept fraction in every group)."""
import numpy as np

from ekg_tf.slimming import batch_norm_layers
from ekg_tf.subnet import SubnetSpec


def randomize_batch_norm(model, rng):
    """Random gamma, beta, moving mean ~ N(0, 0.5) and moving variance ~ U(0.5, 2) in every
    BatchNormalization of `model` (a gated clone or a plain model, nested models included)."""
    for bn in batch_norm_layers(model):
        for v in (bn.gamma, bn.beta, bn.moving_mean):
            v.assign(rng.normal(0, 0.5, v.shape).astype(np.float32))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, bn.moving_variance.shape)
                                  .astype(np.float32))


def random_subnet(gated, rng, min_rate=0.05) -> SubnetSpec:
    """Sets every group of `gated` to a random rank and a rate ~ U(min_rate, 1); returns the
    sub-network's spec."""
    for g in gated.gate_groups:
        g.rank = rng.permutation(g.channels)
        g.rate = float(rng.uniform(min_rate, 1.0))
    return SubnetSpec.from_model(gated)
