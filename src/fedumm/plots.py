"""Matplotlib figures written to files (Agg canvas, no global pyplot state)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from fedumm.io import atomic_write_bytes

__all__ = ["plot_accuracy_per_round", "plot_image_grid"]


def plot_accuracy_per_round(
    path: str | Path,
    rounds: Sequence[int],
    accuracy: Sequence[float],
    *,
    baselines: Mapping[str, float | None] | None = None,
    title: str = "Global validation VQA accuracy",
    ylabel: str = "VQA accuracy (%)",
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
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def plot_image_grid(
    path: str | Path,
    rows: Sequence[tuple[str, Sequence[Image.Image], Sequence[bool] | None]],
    *,
    title: str = "",
) -> Path:
    """Prompts by samples: one row per (label, images, judged correct or None), green/red frames."""
    if not rows:
        raise ValueError("plot_image_grid needs at least one row")
    cols = max(len(images) for _, images, _ in rows)
    fig = Figure(figsize=(1.1 * cols, 1.1 * len(rows) + 0.5), dpi=100)
    fig.subplots_adjust(wspace=0.05, hspace=0.1)
    FigureCanvasAgg(fig)
    for r, (label, images, verdicts) in enumerate(rows):
        for c in range(cols):
            ax = fig.add_subplot(len(rows), cols, r * cols + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c], interpolation="nearest")
                if verdicts is not None:
                    colour = "tab:green" if verdicts[c] else "tab:red"
                    for spine in ax.spines.values():
                        spine.set_edgecolor(colour)
                        spine.set_linewidth(2.5)
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())
