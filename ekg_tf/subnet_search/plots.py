"""PNG plots of a search: MACs ratio and objective per step, kept width per group."""
from __future__ import annotations

import os

from ekg_tf.graph.gates import kept_count
from ekg_tf.utils.plots import save_bar_plot, save_line_plot


def save_search_plots(search_dir: str, history: list, channels: dict) -> list:
    steps = [e["step"] for e in history]
    paths = [os.path.join(search_dir, n) for n in
             ("macs_ratio.png", "objective.png", "kept_width.png")]
    save_line_plot(paths[0], steps, {"MACs ratio": [e["macs_ratio"] for e in history],
                                     "params ratio": [e["params_ratio"] for e in history]},
                   "search step", "ratio to the unpruned network", "Complexity per step")
    save_line_plot(paths[1], steps, {"objective": [e["objective"] for e in history],
                                     "loss (CE)": [e["loss"] for e in history]},
                   "search step", "validation value", "Objective per step")
    final = history[-1]["rates"]
    names = list(channels)
    save_bar_plot(paths[2], names, {"original": [channels[n] for n in names],
                                    "kept": [kept_count(channels[n], max(final[n], 0.0))
                                             for n in names]},
                  "channels", "Kept width per gate group")
    return paths
