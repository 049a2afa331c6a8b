"""PNG plots of results people look at (matplotlib, no display needed)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ekg_tf.utils.io import atomic_path  # noqa: E402


def save_line_plot(path: str, x, series: dict, xlabel: str, ylabel: str, title: str = ""):
    """One line per entry of `series` ({label: y values}) against `x`."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, y in series.items():
        ax.plot(x, y, marker=".", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def save_bar_plot(path: str, labels, series: dict, ylabel: str, title: str = ""):
    """Grouped bars: one group per label, one bar per entry of `series`."""
    import numpy as np
    fig, ax = plt.subplots(figsize=(max(7, 0.25 * len(labels)), 4))
    n = len(series)
    width = 0.8 / max(n, 1)
    pos = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(pos + i * width - 0.4 + width / 2, values, width, label=name)
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def save_points_plot(path: str, points: dict, xlabel: str, ylabel: str, title: str = ""):
    """Labelled points ({label: (x, y)}), e.g. accuracy against MACs ratio."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (x, y) in points.items():
        ax.scatter([x], [y], s=60, label=label, zorder=3)
        ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1.1)
    ys = [y for _, y in points.values()]
    pad = max(0.05, 0.25 * (max(ys) - min(ys)))
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
