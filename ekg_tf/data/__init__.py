"""Data sources and input pipelines."""
from ekg_tf.data.pipeline import input_fn, preprocess_fn
from ekg_tf.data.preprocessing import normalize, normalization_for
from ekg_tf.data.sources import (ArraySplit, DataError, load_arrays, num_classes_for,
                                 raw_dataset, reference_split_indices, synthetic_split)
