"""Resumable training checkpoints (orbax ``CheckpointManager``).

A checkpoint ``<checkpoint dir>/<step>/`` holds two items:

``state``  the train state (train/step.py): trainable params, optimizer state, step, RNG
           key data; saved with ``StandardSave`` (arrays, no pickles), asynchronously
           when ``checkpoint.async_save``;
``meta``   JSON: the checkpoint format (:data:`FORMAT`), the data position (the next
           batch) and the resolved run config.

Only the last ``checkpoint.keep_last`` are kept. Orbax writes into a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoint as the latest. Restoring the latest one and rebuilding the same data stream
at the saved position continues the run exactly (bitwise on CPU).

A checkpoint that cannot be read raises :class:`CheckpointError` before anything is
written, and resuming under a config that changes the run (anything but
:data:`MAY_CHANGE_ON_RESUME`) is refused unless forced. A numbered folder in the
checkpoint directory that is not a checkpoint of ours (no ``state``/``meta`` items) is
refused before orbax may read it or prune it as one of its steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from train.batching import DataPosition
from train.errors import UserError
from train.orbax_loops import settled_restore

# Dotted config keys (or section prefixes) that may differ between a run and its resume.
MAY_CHANGE_ON_RESUME = (
    "output_dir",
    "optim.max_steps",
    "optim.epochs",
    "checkpoint.",
    "eval.",
    "logging.",
)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the fix."""


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"lora.rank": 8, ...}`` from a nested config dict."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: saved -> current"`` for every key that changes the run (sorted)."""
    old, new = flat_config(saved), flat_config(current)
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k) and not k.startswith(MAY_CHANGE_ON_RESUME)
    ]


ITEMS = ("state", "meta")
# The train state's structure, recorded in each checkpoint's meta; a checkpoint of another
# format is refused by name instead of failing deep inside orbax.
FORMATS = {
    1: "no format recorded (lora-jax before 2026-12-03)",
    2: "every method's optimizer state wrapped by lj.optimizer (optax PartitionState)",
}
FORMAT = 2


def check_no_foreign_steps(directory: Path) -> None:
    """Raise CheckpointError if a step-numbered folder in ``directory`` is not ours.

    orbax takes every folder named by an integer for a step: it would try to restore a
    foreign one as the latest, or delete it when pruning to ``keep_last``.
    """
    if not directory.is_dir():
        return
    for child in sorted(directory.iterdir()):
        if child.name.isdigit() and not (
            child.is_dir() and all((child / item).is_dir() for item in ITEMS)
        ):
            raise CheckpointError(
                f"{child} is not a lora-jax checkpoint (a checkpoint holds {' and '.join(ITEMS)}"
                f"/ folders), but orbax would read or prune it as step {int(child.name)}; move it "
                f"out of {directory} and rerun. Nothing was changed"
            )


class Checkpoints:
    """The checkpoints of one run directory (every process of a run makes one)."""

    def __init__(self, directory: str | Path, *, keep_last: int, async_save: bool):
        self.directory = Path(directory).resolve()
        check_no_foreign_steps(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(
        self, step: int, state: Any, position: DataPosition, config: Mapping[str, Any]
    ) -> None:
        """Start saving (returns once the arrays are copied to host when async)."""
        meta = {"format": FORMAT, "data_position": position.to_dict(), "config": dict(config)}
        # force: a step folder here is ours (the directory is claimed, foreign steps refused
        # at construction); a rerun after --force-resume may save a step again
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore_meta(self, step: int) -> dict[str, Any]:
        """``{"format": ..., "data_position": ..., "config": ...}`` of checkpoint ``step``;
        CheckpointError if another version's train state is in it (:data:`FORMAT`)."""
        meta = self._read(step, meta=ocp.args.JsonRestore())["meta"]
        written = meta.get("format", 1)
        if written != FORMAT:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} was written by another version of "
                f"lora-jax (checkpoint format {written}; this version reads format {FORMAT}: "
                f"{FORMATS[FORMAT]}). It is kept as it is; start a new run with another "
                f"output_dir, or resume it with the version that wrote it"
            )
        return meta

    def restore(self, step: int, like: Any) -> tuple[Any, DataPosition]:
        """(state, data position) of checkpoint ``step``.

        ``like`` is a tree of ``jax.ShapeDtypeStruct`` with shardings (the state's
        shape); the arrays are restored with those shardings.
        """
        restored = self._read(
            step, state=ocp.args.StandardRestore(like), meta=ocp.args.JsonRestore()
        )
        return restored["state"], DataPosition.from_dict(restored["meta"]["data_position"])

    def _read(self, step: int, **items: ocp.args.CheckpointArgs) -> Any:
        try:
            with settled_restore():  # a failed restore leaves no orphaned reads behind
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            if "meta" in items:
                DataPosition.from_dict(restored["meta"]["data_position"])
            return restored
        except Exception as e:  # orbax raises many types for missing or garbled files
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be read ({type(e).__name__}: "
                f"{_one_line(e)}); it is truncated or corrupted. Nothing was written. Move "
                f"that directory out of {self.directory} to resume from the previous checkpoint "
                f"(steps on disk: {sorted(self._manager.all_steps())}), or start a new run with "
                f"another output_dir"
            ) from e

    def wait(self) -> None:
        """Block until every pending save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.close()


def _one_line(error: BaseException, limit: int = 300) -> str:
    """``error``'s message on one line, at most ``limit`` characters."""
    return " ".join(str(error).split())[:limit]


def abstract_like(state: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with ``shardings``) shaped like ``state``."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
