"""Run metrics: ``metrics.jsonl``, TensorBoard event files (tensorboardX) and the progress bar.

A record is one JSON object per line, ``{"step": 10, "split": "train", "loss": 2.31, ...}``
(``split`` is ``train`` or ``validation``); TensorBoard gets the same values under the
tag ``<split>/<name>``. Losses are in nats per target token, ``tokens_per_s`` counts
non-padding tokens per wall-clock second of the last update, ``step_s`` is the median
wall-clock seconds per update over the logging window. Only process 0 writes; on a resume, records
after the resumed step (from the steps that are about to be redone) are dropped.

A last line cut short (a crash or a full disk in the middle of a write) is dropped on
resume, and said so; any other line that is not a record stops the run with a
:class:`MetricsFileError` naming the file and line, and the file is left as it is.
Rewrites go through a temporary file and a rename, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from train import layout
from train.errors import UserError


class MetricsFileError(UserError, ValueError):
    """A metrics.jsonl that lora-jax did not write as it is; names the file, line and fix."""


def read_records(path: Path, on_torn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (none if it does not exist).

    A torn last line (no newline at its end, not valid JSON) is dropped and reported to
    ``on_torn``; any other line that is not a ``{"step": int, "split": str, ...}`` record
    raises MetricsFileError.
    """
    if not path.is_file():
        return []
    text = path.read_text(errors="replace")
    lines = text.split("\n")  # the last item is "" when the file ends with a newline
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # no newline after it: a write that did not finish
                if on_torn is not None:
                    on_torn(
                        f"dropped the torn last line of {path} (a write cut short, e.g. by a "
                        f"crash or a full disk): {line[:60]!r}"
                    )
                continue
            raise MetricsFileError(
                f"{path} line {number} is not JSON ({line[:60]!r}); lora-jax "
                f"did not write it. Move the file out of the run directory "
                f"and rerun; nothing was changed"
            ) from None
        if not (
            isinstance(record, dict)
            and isinstance(record.get("step"), int)
            and isinstance(record.get("split"), str)
        ):
            raise MetricsFileError(
                f"{path} line {number} is not a lora-jax record (it needs an "
                f'integer "step" and a "split"): {line[:60]!r}. Move the '
                f"file out of the run directory and rerun; nothing was "
                f"changed"
            )
        records.append(record)
    return records


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` through a temporary file and a rename (``path`` is a
    run's metrics.jsonl: inside a claimed run directory, every line checked as ours)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _summary_writer(directory: Path) -> Any:
    """A tensorboardX writer; imported here because tensorboardX imports torch (seconds)
    when it is installed, which every ``lora-jax`` command would pay at startup."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(directory))


class MetricsLog:
    """Writes records to JSONL and TensorBoard and keeps them for the loss curve."""

    def __init__(
        self,
        run_dir: Path,
        *,
        jsonl: bool,
        tensorboard: bool,
        resume_step: int,
        enabled: bool = True,
        log: Callable[[str], None] = print,
    ):
        self._path = run_dir / layout.METRICS_FILE
        torn: list[str] = []
        on_disk = read_records(self._path, on_torn=torn.append) if enabled else []
        self.records = [r for r in on_disk if r["step"] <= resume_step]
        self._jsonl = jsonl and enabled
        unterminated = bool(on_disk) and not self._path.read_bytes().endswith(b"\n")
        if self._jsonl and (torn or unterminated or len(self.records) < len(on_disk)):
            for message in torn:
                log(message)
            _write_atomic(self._path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._tb = (
            _summary_writer(run_dir / layout.TENSORBOARD_DIR) if tensorboard and enabled else None
        )

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
    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        dynamic_ncols=True,
        disable=not enabled,
        desc="train",
    )
