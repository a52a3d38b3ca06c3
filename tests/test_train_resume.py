"""train/checkpoint.py + train/run.py: exact resume, config checks on resume, unreadable
checkpoints (divergence and the other faults: tests/test_faults.py)."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from train.checkpoint import FORMAT, CheckpointError, config_changes
from train.run import train

import train_fixtures as tf

pytestmark = pytest.mark.usefixtures("jax_compilation_cache")


def test_stop_and_resume_is_bitwise_identical_to_a_straight_run(run_files):
    model_dir, csv, root = run_files
    straight = train(tf.tiny_config(model_dir, csv, root / "straight", *tf.RESUME), **tf.QUIET)
    cfg = tf.tiny_config(model_dir, csv, root / "paused", *tf.RESUME)
    stopped = train(cfg, stop_after=3, **tf.QUIET)
    assert stopped.step == 3 and not (root / "paused" / "adapter").exists()
    resumed = train(cfg, **tf.QUIET)
    assert straight.step == resumed.step == 6
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tf.train_losses(root / "paused") == tf.train_losses(root / "straight")
    assert resumed.validation_after == straight.validation_after
    assert sorted(p.name for p in (root / "paused" / "checkpoints").iterdir()) == ["4", "6"]


def test_resume_with_a_changed_config_is_refused_unless_forced(run_files):
    model_dir, csv, root = run_files
    train(tf.tiny_config(model_dir, csv, root / "changed", "optim.max_steps=2"), **tf.QUIET)
    changed = tf.tiny_config(
        model_dir, csv, root / "changed", "optim.max_steps=2", "optim.learning_rate=5e-3"
    )
    with pytest.raises(CheckpointError, match=r"optim.learning_rate: 0.01 -> 0.005.*--force"):
        train(changed, **tf.QUIET)
    assert train(changed, force_resume=True, **tf.QUIET).step == 2
    # Training longer, or logging differently, is a plain resume.
    longer = tf.tiny_config(
        model_dir, csv, root / "changed", "optim.max_steps=3", "logging.every_steps=2"
    )
    assert train(longer, **tf.QUIET).step == 3


def test_config_changes_ignore_what_may_change_on_resume():
    saved = {"optim": {"max_steps": 3, "learning_rate": 1.0}, "eval": {"every_steps": 1}}
    current = {"optim": {"max_steps": 9, "learning_rate": 2.0}, "eval": {"every_steps": 5}}
    assert config_changes(saved, current) == ["optim.learning_rate: 1.0 -> 2.0"]


@pytest.mark.parametrize("damage", ["state", "meta"])
def test_an_unreadable_checkpoint_is_an_error_and_nothing_is_overwritten(run_files, damage):
    model_dir, csv, root = run_files
    run_dir = root / f"damaged_{damage}"
    cfg = tf.tiny_config(model_dir, csv, run_dir, "optim.max_steps=3")
    train(cfg, stop_after=2, **tf.QUIET)
    item = run_dir / "checkpoints" / "2" / damage
    if damage == "state":
        shutil.rmtree(item / "d")  # the array data of the latest checkpoint is gone
    else:
        (item / "metadata").write_text('{"data_posit')  # a truncated JSON file
    before = tf.snapshot(run_dir)
    with pytest.raises(CheckpointError, match=r"checkpoints/2 cannot be read.*Move that"):
        train(cfg, **tf.QUIET)
    assert tf.snapshot(run_dir) == before


def test_a_checkpoint_of_another_format_is_named_and_kept(run_files):
    model_dir, csv, root = run_files
    run_dir = root / "old_format"
    cfg = tf.tiny_config(model_dir, csv, run_dir, "optim.max_steps=3")
    train(cfg, stop_after=2, **tf.QUIET)
    meta = run_dir / "checkpoints" / "2" / "meta" / "metadata"
    written = json.loads(meta.read_text())
    assert written.pop("format") == FORMAT
    meta.write_text(json.dumps(written))  # as a version before formats were recorded
    before = tf.snapshot(run_dir)
    with pytest.raises(
        CheckpointError,
        match=r"checkpoints/2 was written by another version "
        r"of lora-jax \(checkpoint format 1; this version "
        r"reads format 2",
    ):
        train(cfg, **tf.QUIET)
    assert tf.snapshot(run_dir) == before
