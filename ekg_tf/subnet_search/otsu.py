"""Trimmed Otsu threshold: splits a 1-D set of values into a low and a high class."""
from __future__ import annotations

import math

import numpy as np


def trimmed_otsu(values, cut: float = 0.2) -> float:
    """Otsu's threshold of `values` after dropping `ceil(n*cut)` values at each end.

    As the reference: sort, trim, then for every split point t in 1..m-2 of the
    m remaining values maximise `t * (m - t) * (mean(low) - mean(high))**2`; the
    threshold is the midpoint of the two values around the best split. Values
    at or below it form the low class.

    Small sets (the reference would crash on them): when trimming leaves fewer
    than 3 values the untrimmed values are used; with fewer than 3 values in all
    the threshold is the largest value (everything is in the low class).
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size == 0:
        raise ValueError("trimmed_otsu needs at least one value")
    if not np.all(np.isfinite(v)):
        raise ValueError("trimmed_otsu: values must be finite")
    trim = int(math.ceil(v.size * cut))
    trimmed = v[trim:v.size - trim] if trim > 0 else v
    if trimmed.size < 3:
        trimmed = v
    if trimmed.size < 3:
        return float(v[-1])
    m = trimmed.size
    best_t, best_val = 1, -1.0
    for t in range(1, m - 1):
        between = t * (m - t) * (trimmed[:t].mean() - trimmed[t:].mean()) ** 2
        if between > best_val:  # first maximum, as np.argmax
            best_t, best_val = t, between
    return float((trimmed[best_t - 1] + trimmed[best_t]) / 2)
