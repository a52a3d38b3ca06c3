"""The loss curve: train and validation loss (nats per target token) against the step,
one line per split (and per adapter when several train together)."""

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


def loss_lines(records: Sequence[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """``{split: (steps, losses)}`` of the records, training splits first: ``train`` and
    ``validation``, or with k adapters trained together ``train/adapter_<j>`` ...
    ``validation/adapter_<j>`` (train/bank.py), adapters in the order they appear."""
    adapters = list(dict.fromkeys(r["split"].partition("/")[2] for r in records))
    lines = {}
    for split in ("train", "validation"):
        for adapter in adapters:
            name = f"{split}/{adapter}" if adapter else split
            points = [(r["step"], r["loss"]) for r in records if r["split"] == name]
            if points:
                steps, losses = zip(*points, strict=True)
                lines[name] = (list(steps), list(losses))
    return lines


def plot_loss_curve(records: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Save a PNG of :func:`loss_lines`: one colour per adapter, solid for training, dots
    for validation; returns ``path``."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    adapters = list(dict.fromkeys(name.partition("/")[2] for name in loss_lines(records)))
    for name, (steps, losses) in loss_lines(records).items():
        split, _, adapter = name.partition("/")
        color = colors[adapters.index(adapter) % len(colors)] if adapter else None
        axes.plot(steps, losses, "o-" if split == "validation" else "-", label=name, color=color)
    axes.set_xlabel("step (optimizer update)")
    axes.set_ylabel("loss (nats / target token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
