"""Matplotlib figures written to files (Agg canvas, no global pyplot state)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedumm.io import atomic_write_bytes

__all__ = ["plot_accuracy_per_round"]


def plot_accuracy_per_round(
    path: str | Path,
    rounds: Sequence[int],
    accuracy: Sequence[float],
    *,
    baselines: Mapping[str, float | None] | None = None,
    title: str = "Global validation VQA accuracy",
) -> Path:
    """Line plot of accuracy per round with horizontal baseline lines."""
    fig = Figure(figsize=(6, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(list(rounds), list(accuracy), marker="o", label="federated")
    styles = ["--", ":", "-."]
    for i, (name, value) in enumerate((baselines or {}).items()):
        if value is not None:
            ax.axhline(value, linestyle=styles[i % len(styles)], color=f"C{i + 1}", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("VQA accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())
