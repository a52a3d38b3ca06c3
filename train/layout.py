"""The directories lora-jax writes, and the names of what is in them, in one place.

A **run directory** (``lora-jax train``'s ``output_dir``)::

    config.yaml        the resolved config (train/config.py)
    metrics.jsonl      train/validation records (train/metrics.py)
    tensorboard/       TensorBoard event files
    loss_curve.png     train and validation loss against the step (train/plot.py)
    run_info.json      parameter counts and optimizer-state bytes (train/run.py ``run_info``)
    checkpoints/       resumable checkpoints (unless ``checkpoint.dir`` points elsewhere)
    adapter/           the final artifact, an adapter directory
    adapter_<j>/       instead, with lora.num_adapters = k > 1: adapter j of the k (train/bank.py)

An **adapter directory** (train/adapter.py)::

    weights/           orbax tree of what the run adds to or replaces in the base
    adapter.json       method, model and load options, LoRA config, leaf specs, base fingerprint

A **merged directory** (``lora-jax merge --out``): a Hugging Face checkpoint
(models/hf_export.py), and with ``--orbax`` ``params/``, the same merged tree in orbax.

Each directory carries an ownership mark naming its :class:`Kind` (train/rundir.py): a
command writes only into a new, empty or same-kind directory.
"""

from __future__ import annotations

import enum

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_CURVE_FILE = "loss_curve.png"
RUN_INFO_FILE = "run_info.json"
CHECKPOINT_DIR = "checkpoints"
ADAPTER_DIR = "adapter"

ADAPTER_META_FILE = "adapter.json"
ADAPTER_WEIGHTS_DIR = "weights"

MERGED_PARAMS_DIR = "params"


class Kind(enum.StrEnum):
    """What a directory lora-jax owns holds, as its ownership mark records it."""

    RUN = "run"  # lora-jax train's output_dir
    CHECKPOINTS = "checkpoints"  # a checkpoint.dir outside the run directory
    ADAPTER = "adapter"  # a run's adapter/, or import-peft --out
    MERGED = "merged"  # lora-jax merge --out
    PEFT = "peft"  # lora-jax export --format peft --out
    EVAL = "eval"  # lora-jax eval --out
    EXPERIMENT = "experiment"  # lora-jax experiment's output_dir
    ANALYSIS = "analysis"  # lora-jax analyze --out
