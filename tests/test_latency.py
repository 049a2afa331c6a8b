"""The latency model (ekg_tf.latency): blocks of a traced model, their cache keyed by
runtime, versions, threads, batch and machine, predictions, latency targets in the search,
and bad values as clear errors. The timed evidence is benchmarks/latency_model.py."""
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from ekg_tf.errors import UserError
from ekg_tf.graph.gated import GatedModel
from ekg_tf.latency import LatencyModel, LatencyTable, Runtime
from ekg_tf.latency.model import ANCHOR_TIMINGS, segment_grids
from ekg_tf.latency.segments import segment_graph, segment_model
from ekg_tf.models import build_model
from ekg_tf.subnet_search.search import EKGSearch, SearchSettings


def test_resnet_blocks_are_the_residual_blocks():
    gated = GatedModel(build_model("resnet20", 10))
    segments = segment_graph(gated.dependency)
    names = [s.name for s in segments]
    # stem (conv, BN, ReLU), 9 residual blocks (each with its add + ReLU), the classifier
    assert names[0] == "conv" and len(segments) == 11
    assert [n for n in names[1:10]] == [f"block{s}_{b}_conv1" for s in range(3) for b in range(3)]
    # the two inner blocks of stage 1 are the same block (one table entry serves both);
    # the first one (stride, projection) and the last one (global pooling) are not
    sig = {s.name: s.signature for s in segments}
    assert sig["block1_1_conv1"] == sig["block1_2_conv1"] != sig["block1_0_conv1"]
    assert sig["block2_1_conv1"] != sig["block2_2_conv1"]  # the last block pools
    # a stride block: the stream in, its inner group, the new stream (the projection's)
    assert segments[4].groups == ("conv", "block1_0_conv1", "block1_0_conv3")
    assert segments[5].groups == ("block1_0_conv3", "block1_1_conv1")
    # a block at given widths is a plain, BN-folded model of those widths
    seg = segments[5]
    kept = {seg.groups[0]: 16, seg.groups[1]: 8}
    model = segment_model(gated.dependency, seg, kept)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [8, 16] and model.inputs[0].shape[-1] == 16
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in model.layers)


def test_grids_are_the_aligned_widths_within_the_cell_budget():
    assert segment_grids([64, 64], [8, 8]) == [[8, 16, 24, 32, 40, 48, 56, 64]] * 2
    grids = segment_grids([64, 64, 64], [8, 8, 8], max_cells=64)
    assert np.prod([len(g) for g in grids]) <= 64 and all(g[0] == 8 and g[-1] == 64
                                                          for g in grids)
    # unaligned or wide groups: 9 points with both ends, interpolated between
    assert segment_grids([16, 960], [1, 8]) == [[1, 3, 5, 7, 9, 10, 12, 14, 16],
                                                [8, 128, 248, 368, 488, 600, 720, 840, 960]]


def test_table_cache_is_keyed_by_runtime_threads_and_batch(tmp_path):
    tables = [LatencyTable(Runtime("tflite", 2), 1, str(tmp_path)),
              LatencyTable(Runtime("tflite", 1), 1, str(tmp_path)),
              LatencyTable(Runtime("onnxruntime", 2), 1, str(tmp_path)),
              LatencyTable(Runtime("tflite", 2), 32, str(tmp_path))]
    assert len({t.path for t in tables}) == 4
    tables[0].put_cell("abc", (8, 16), 0.25)
    tables[0].save()
    again = LatencyTable(Runtime("tflite", 2), 1, str(tmp_path))
    assert again.cell("abc", (8, 16)) == 0.25 and again.cell("abc", (16, 16)) is None
    for other in (LatencyTable(Runtime("tflite", 1), 1, str(tmp_path)),
                  LatencyTable(Runtime("onnxruntime", 2), 1, str(tmp_path)),
                  LatencyTable(Runtime("tflite", 2), 32, str(tmp_path))):
        assert other.cell("abc", (8, 16)) is None
    with open(again.path) as f:
        key = json.load(f)["key"]
    assert key["runtime"] == "tflite" and key["threads"] == 2 and key["batch"] == 1
    assert "litert" in key["version"] and key["machine"]
    assert "onnxruntime" in tables[2].key["version"]


def _tiny_model(size=32, width=64):
    """Stem, one residual block, classifier: two groups (the stream, the block's inner)."""
    x = keras.Input((size, size, 3))
    L = keras.layers
    s = L.ReLU(name="r0")(L.BatchNormalization(name="b0")(
        L.Conv2D(width, 3, padding="same", use_bias=False, name="c0")(x)))
    y = L.ReLU(name="r1")(L.BatchNormalization(name="b1")(
        L.Conv2D(width, 3, padding="same", use_bias=False, name="c1")(s)))
    y = L.BatchNormalization(name="b2")(L.Conv2D(width, 3, padding="same", use_bias=False,
                                                 name="c2")(y))
    y = L.ReLU(name="r2")(L.Add(name="add")([s, y]))
    y = L.GlobalAveragePooling2D(name="gap")(y)
    return keras.Model(x, L.Dense(4, name="fc")(y), name="tiny")


def test_cells_slower_than_a_wider_cell_are_the_ones_timed_again(tmp_path):
    """Interference only adds time: a cell more than 10% slower than a cell of its block
    with every group at least as wide is picked for re-timing, no other (table filled by
    hand; nothing is timed)."""
    gated = GatedModel(_tiny_model())
    model = LatencyModel(gated, Runtime("tflite", 1), 1, str(tmp_path), round_to=32,
                         build=False)
    for segment, widths in model.cells():  # 1 ms per 32 channels summed: monotone
        model.table.put_cell(segment.signature, widths, sum(widths) / 32.0)
    assert model.slow_cells() == []
    block = model.segments[1]  # the residual block: (stream, inner) at 32 or 64 each
    model.table.put_cell(block.signature, (32, 64), 4.5)  # slower than (64, 64) = 4.0
    model.table.put_cell(block.signature, (64, 32), 4.3)  # within 10% of (64, 64)
    assert model.slow_cells() == [(block, (32, 64))]


@pytest.mark.parametrize("runtime", ["tflite", "onnxruntime"])
def test_latency_model_times_caches_and_predicts(tmp_path, runtime):
    """Real timings of a tiny model's blocks and networks on the real runtime: predictions
    are the least-squares line through the measured networks (the unpruned, the narrowest
    and the random calibration ones, each the median of ANCHOR_TIMINGS timings), a second
    model reads the cache (times nothing), narrower widths are faster, and a search's
    latency target reads the model."""
    gated = GatedModel(_tiny_model())
    rt = Runtime(runtime, 1)
    model = LatencyModel(gated, rt, 1, str(tmp_path), round_to=32, runs=5, build=False,
                         calibration_networks=2)
    timings, anchors = [], []  # every timing; (timings within an anchor, its value)
    time_network, time_anchor = model.time_network, model.time_anchor

    def record_timing(m):
        timings.append(time_network(m))
        return timings[-1]

    def record_anchor(m):
        start = len(timings)
        anchors.append((None, time_anchor(m)))
        anchors[-1] = (timings[start:], anchors[-1][1])
        return anchors[-1][1]

    model.time_network, model.time_anchor = record_timing, record_anchor
    model.build()
    assert len(anchors) == 2 + 2 and all(len(t) == ANCHOR_TIMINGS and ms == np.median(t)
                                         for t, ms in anchors)
    assert {model.narrowest_ms, model.dense_ms} <= {ms for _, ms in anchors}
    # blocks: the stem, the residual block (with the pooling), the classifier; 2 widths each
    assert [len(s.groups) for s in model.segments] == [1, 2, 1]
    assert not model.missing() and len(model.table) == len(model.cells()) == 2 + 4 + 2
    # the line through the measured networks (recomputed here from the table)
    measured = [(model.blocks_ms(r), model.table.networks[k]) for k, r in model._networks()]
    slope, intercept = np.polyfit(*np.array(measured).T, 1)
    narrow = {g.name: 0.5 for g in gated.gate_groups}  # 32 of 64 channels: 1/4 of the MACs
    for rates in ({}, narrow, model.calibration_rates[0]):
        assert model.predict_ms(rates) == pytest.approx(intercept + slope * model.blocks_ms(rates))
    assert model.narrowest_ms < 0.8 * model.dense_ms
    assert model.predict_ms(narrow) < 0.8 * model.predict_ms({})
    assert model.blocks_ms(narrow) < 0.8 * model.blocks_ms({})
    again = LatencyModel(gated, rt, 1, str(tmp_path), round_to=32, runs=5, build=False,
                         calibration_networks=2)
    assert again.build() == 0 and again.dense_ms == model.dense_ms
    # the search's target is a fraction of this model's predicted latency
    settings = SearchSettings(target_metric="latency", target_ms=0.9 * model.dense_ms,
                              runtime=runtime, runtime_threads=1, round_to=32)
    search = EKGSearch(gated, type("E", (), {"labels": None})(), settings, str(tmp_path / "s"),
                       {}, latency_model=model)
    assert search.target == pytest.approx(0.9)
    assert search.ratio_of(narrow) == pytest.approx(model.ratio(narrow))
    with pytest.raises(UserError, match="must be below the unpruned network"):
        EKGSearch(gated, type("E", (), {"labels": None})(),
                  SearchSettings(target_metric="latency", target_ms=10 * model.dense_ms,
                                 runtime=runtime, runtime_threads=1),
                  str(tmp_path / "s"), {}, latency_model=model)


def test_bad_latency_settings_are_clear_errors():
    with pytest.raises(UserError, match=r"search.runtime must be one of \('tflite', "
                                         r"'onnxruntime'\).*'tensorrt'"):
        SearchSettings(target_metric="latency", runtime="tensorrt")
    with pytest.raises(UserError, match="search.runtime must be one of"):
        Runtime("coreml")
    with pytest.raises(UserError, match="threads must be an integer >= 1"):
        Runtime("tflite", 0)
    with pytest.raises(UserError, match="search.target_metric must be one of"):
        SearchSettings(target_metric="flops")
    with pytest.raises(UserError, match="needs search.target_metric=latency"):
        SearchSettings(target_ms=3.0)
    with pytest.raises(UserError, match="latency batch size must be"):
        LatencyTable(Runtime("tflite"), 0)
    with pytest.raises(UserError, match="needs a latency model"):
        EKGSearch(GatedModel(_tiny_model()), type("E", (), {"labels": None})(),
                  SearchSettings(target_metric="latency"), "unused", {})
