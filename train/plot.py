"""The loss curve: train and validation loss (nats per target token) against the step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` drawing to files only (imported on first use: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(records: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Save a PNG of the ``loss`` of every record, one line per split; returns ``path``."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    for split, style in (("train", "-"), ("validation", "o-")):
        points = [(r["step"], r["loss"]) for r in records if r["split"] == split]
        if points:
            steps, losses = zip(*points, strict=True)
            axes.plot(steps, losses, style, label=split)
    axes.set_xlabel("step (optimizer update)")
    axes.set_ylabel("loss (nats / target token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
