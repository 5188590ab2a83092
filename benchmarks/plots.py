"""Grouped bar charts for the benchmark reports, written as PNG files next to their tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display; chosen before pyplot is imported
import matplotlib.pyplot as plt


@dataclass
class Panel:
    """One chart: for each series (a legend entry), one bar per group (an x-axis label).

    `series` values may be None (drawn as a gap); `ranges` optionally gives a (low, high) error bar for
    every bar of a series; `baseline` draws a dashed horizontal line (e.g. speedup 1)."""

    title: str
    groups: list[str]
    series: dict[str, list[float | None]]
    ranges: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    baseline: float | None = None


def save_bar_chart(path: Path, title: str, panels: list[Panel]) -> None:
    """The panels side by side in one PNG at `path`."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        _draw(ax, panel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw(ax, panel: Panel) -> None:
    x, width = np.arange(len(panel.groups)), 0.8 / len(panel.series)
    for i, (label, values) in enumerate(panel.series.items()):
        heights = np.array([np.nan if v is None else v for v in values], dtype=float)
        errors = None
        if label in panel.ranges:  # matplotlib wants distances below and above each bar's top
            low, high = np.array(panel.ranges[label], dtype=float).T
            errors = [heights - low, high - heights]
        bars = ax.bar(x + (i - (len(panel.series) - 1) / 2) * width, heights, width, yerr=errors, capsize=3,
                      label=label)
        ax.bar_label(bars, labels=["" if v is None else f"{v:.2f}" for v in values], fontsize=7)
    if panel.baseline is not None:
        ax.axhline(panel.baseline, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(x, panel.groups, rotation=20, ha="right", fontsize=8)
    ax.set_title(panel.title, fontsize=10)
    ax.legend(fontsize=7)
