"""Figures shared by training, evaluation and the synthetic study (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def line_plot(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *,
              title: str, xlabel: str, ylabel: str, log_y: bool = False) -> Path:
    """One line per named (x, y) curve, saved as PNG."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if log_y:
        ax.set_yscale("log")
    if len(curves) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
