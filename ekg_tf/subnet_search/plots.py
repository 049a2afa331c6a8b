"""PNG plots of a search: MACs ratio and objective per step, kept width per group."""
from __future__ import annotations

import os

from ekg_tf.graph.gates import kept_count
from ekg_tf.utils.plots import save_bar_plot, save_line_plot


def save_search_plots(search_dir: str, history: list, channels: dict,
                      round_to: dict | None = None) -> list:
    """PNGs of the search in `search_dir`; `round_to`: {group: round_to} (default 1)."""
    round_to = round_to or {}
    steps = [e["step"] for e in history]
    paths = [os.path.join(search_dir, n) for n in
             ("macs_ratio.png", "objective.png", "kept_width.png")]
    lines = {"MACs ratio": [e["macs_ratio"] for e in history],
             "params ratio": [e["params_ratio"] for e in history]}
    if all("latency_ratio" in e for e in history):
        lines["predicted latency ratio"] = [e["latency_ratio"] for e in history]
    save_line_plot(paths[0], steps, lines, "search step", "ratio to the unpruned network",
                   "Complexity per step")
    save_line_plot(paths[1], steps, {"objective": [e["objective"] for e in history],
                                     "loss (CE)": [e["loss"] for e in history]},
                   "search step", "validation value", "Objective per step")
    final = history[-1]["rates"]
    names = list(channels)
    save_bar_plot(paths[2], names, {"original": [channels[n] for n in names],
                                    "kept": [kept_count(channels[n], max(final[n], 0.0),
                                                        round_to.get(n, 1)) for n in names]},
                  "channels", "Kept width per gate group")
    return paths
