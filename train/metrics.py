"""Run metrics: ``metrics.jsonl``, TensorBoard event files (tensorboardX) and the progress bar.

A record is one JSON object per line, ``{"step": 10, "split": "train", "loss": 2.31, ...}``
(``split`` is ``train`` or ``validation``); TensorBoard gets the same values under the
tag ``<split>/<name>``. Losses are in nats per target token, ``tokens_per_s`` counts
non-padding tokens per wall-clock second of the last update, ``step_s`` is the median
wall-clock seconds per update over the logging window. Only process 0 writes; on a resume, records
after the resumed step (from the steps that are about to be redone) are dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (none if it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _summary_writer(directory: Path) -> Any:
    """A tensorboardX writer; imported here because tensorboardX imports torch (seconds)
    when it is installed, which every ``lora-jax`` command would pay at startup."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(directory))


class MetricsLog:
    """Writes records to JSONL and TensorBoard and keeps them for the loss curve."""

    def __init__(self, run_dir: Path, *, jsonl: bool, tensorboard: bool, resume_step: int,
                 enabled: bool = True):
        self._path = run_dir / METRICS_FILE
        self.records = [r for r in read_records(self._path) if r["step"] <= resume_step]
        self._jsonl = jsonl and enabled
        if self._jsonl:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self._tb = (_summary_writer(run_dir / TENSORBOARD_DIR)
                    if tensorboard and enabled else None)

    def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
        """Append one record of float ``values`` at ``step``."""
        record = {"step": step, "split": split, **{k: float(v) for k, v in values.items()}}
        self.records.append(record)
        if self._jsonl:
            with self._path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(f"{split}/{name}", float(value), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """A step counter with ETA; the loop sets ``loss`` and ``tok/s`` as its postfix."""
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=not enabled, desc="train")
