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
    lines: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if r["split"].partition("/")[0] in ("train", "validation"):
            steps, losses = lines.setdefault(r["split"], ([], []))
            steps.append(r["step"])
            losses.append(r["loss"])
    return dict(sorted(lines.items(), key=lambda line: line[0].startswith("validation")))


def plot_loss_curve(records: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Save a PNG of :func:`loss_lines`: one colour per adapter, solid for training, dots
    for validation; returns ``path``."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = loss_lines(records)
    adapters = list(dict.fromkeys(name.partition("/")[2] for name in lines))
    for name, (steps, losses) in lines.items():
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
