"""Fault injection on ``lora-jax train``: kills, Ctrl-C, torn files, a full disk, foreign
files, two processes, divergence. Each fault is planted from the inside (tests/fault_driver.py
or monkeypatch), so it strikes at the same moment on any machine; docs/reliability.md
tabulates them.

The reference for every recovery is a straight run of the same config: a rerun after the
fault must end in a train state bitwise equal to it, with the same logged losses.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from train import guard, metrics, rundir
from train.checkpoint import CheckpointError, Checkpoints
from train.cli import INTERRUPTED, main
from train.config import config_to_yaml
from train.loop import DivergenceError
from train.run import NoLearningError, train

import train_fixtures as tf

DRIVER = Path(__file__).with_name("fault_driver.py")
pytestmark = pytest.mark.usefixtures("jax_compilation_cache")


def assert_same_state(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(run_files):
    """The reference: the tf.RESUME config trained start to end without a fault."""
    model_dir, csv, root = run_files
    return train(tf.tiny_config(model_dir, csv, root / "straight", *tf.RESUME), **tf.QUIET)


def write_config(run_files, name: str, *overrides: str):
    """(config YAML path, its RunConfig, run dir) of a tf.RESUME run into ``root/name``."""
    model_dir, csv, root = run_files
    cfg = tf.tiny_config(model_dir, csv, root / name, *tf.RESUME, *overrides)
    path = root / f"{name}.yaml"
    path.write_text(config_to_yaml(cfg))
    return path, cfg, root / name


def drive(fault: str, *args: str, cache: Path, **env: str) -> subprocess.Popen:
    """``lora-jax ARGS`` in a new process with ``fault`` planted (tests/fault_driver.py)."""
    env = dict(
        os.environ,
        FAULT_JAX_CACHE=str(cache),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(tf.REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        **env,
    )
    return subprocess.Popen(
        [sys.executable, str(DRIVER), fault, *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.fixture
def cache(jax_compilation_cache) -> Path:
    """The module's persistent compilation cache (tests/conftest.py), for driven processes."""
    return jax_compilation_cache


KILLS = [
    "kill-after-setup",
    "kill-in-metrics-write",
    "kill-in-checkpoint-save",
    "kill-after-checkpoint",
    "kill-in-adapter-save",
    "kill-in-final-validation",
]


@pytest.mark.parametrize("fault", KILLS)
def test_a_rerun_after_kill_9_at_any_moment_ends_as_a_straight_run(
    run_files, straight, cache, fault
):
    config, cfg, run_dir = write_config(run_files, fault)
    killed = drive(fault, "train", str(config), cache=cache)
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -9, err[-2000:]
    said: list[str] = []
    resumed = train(cfg, log=said.append)
    assert resumed.step == 6
    assert_same_state(resumed.state, straight.state)
    assert tf.train_losses(run_dir) == tf.train_losses(straight.run_dir)
    assert resumed.validation_after == straight.validation_after
    assert (run_dir / "adapter" / "adapter.json").is_file()
    assert not (run_dir / rundir.LOCK_FILE).exists()
    if fault == "kill-after-setup":  # its lock was left behind by a process now gone
        assert any("took over the lock" in line for line in said)
    if fault == "kill-in-metrics-write":
        assert any("dropped the torn last line" in line for line in said)


@pytest.mark.parametrize("fault", ["sigint-at-step-2", "double-sigint-at-step-2"])
def test_ctrl_c_stops_with_one_line_and_exit_130_and_a_rerun_resumes(
    run_files, straight, cache, fault
):
    config, cfg, run_dir = write_config(run_files, fault)
    stopped = drive(fault, "train", str(config), cache=cache)
    _, err = stopped.communicate(timeout=300)
    assert stopped.returncode == INTERRUPTED, err[-2000:]
    assert "Traceback" not in err
    if fault == "sigint-at-step-2":  # stops at the step boundary, with a checkpoint there
        assert "stopped at step 2; rerun the same command to resume" in err
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2"]
    else:
        assert "interrupted" in err.splitlines()[-1]
    resumed = train(cfg, **tf.QUIET)
    assert_same_state(resumed.state, straight.state)
    assert tf.train_losses(run_dir) == tf.train_losses(straight.run_dir)


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["metrics", "checkpoint"])
def test_a_full_disk_is_one_line_and_a_rerun_resumes(
    run_files, straight, monkeypatch, capsys, where
):
    config, cfg, run_dir = write_config(run_files, f"full_{where}")
    if where == "metrics":  # half a record reaches the disk at step 3, then ENOSPC
        write = metrics.MetricsLog.write

        def patched(self, step, split, values):
            if step == 3 and split == "train":
                with self._path.open("a") as f:
                    f.write('{"step": 3, "split": "tr')
                _disk_full()
            return write(self, step, split, values)

        monkeypatch.setattr(metrics.MetricsLog, "write", patched)
    else:  # the step-4 checkpoint cannot be written
        save = Checkpoints.save
        monkeypatch.setattr(
            Checkpoints,
            "save",
            lambda self, step, *a: _disk_full() if step == 4 else save(self, step, *a),
        )
    err = tf.refused(["train", str(config)], capsys)
    assert "the disk is full" in err
    assert "resumes from the checkpoint at step 2" in err
    monkeypatch.undo()
    resumed = train(cfg, **tf.QUIET)
    assert_same_state(resumed.state, straight.state)
    assert tf.train_losses(run_dir) == tf.train_losses(straight.run_dir)


def test_a_second_run_on_a_locked_directory_is_refused(run_files, cache, tmp_path, capsys):
    config, _, run_dir = write_config(run_files, "locked")
    release = tmp_path / "release"
    first = drive("hold-at-step-1", "train", str(config), cache=cache, FAULT_RELEASE=str(release))
    try:
        lines = iter(first.stdout.readline, "")
        assert any(line.strip() == "holding at step 1" for line in lines)
        before = tf.snapshot(run_dir)
        err = tf.refused(["train", str(config)], capsys)
        assert f"is in use by process {first.pid} on host" in err
        assert tf.snapshot(run_dir) == before
    finally:
        release.touch()
        first.communicate(timeout=300)
    assert first.returncode == 0


def test_a_foreign_folder_is_refused_and_left_untouched(run_files, monkeypatch, capsys):
    config, _, run_dir = write_config(run_files, "foreign")
    for name, text in [
        ("adapter/weights/mine.bin", "precious"),
        ("config.yaml", "mine: 1\n"),
        ("run_info.json", "{}"),
        ("loss_curve.png", "png"),
        ("metrics.jsonl", '{"step": 0, "split": "x"}\n{"note": "no step"}\n'),
    ]:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(text)
    before = tf.snapshot(run_dir)
    monkeypatch.setattr("models.load", _must_not_load)
    err = tf.refused(["train", str(config)], capsys)
    assert "is not empty and was not created by lora-jax" in err
    assert tf.snapshot(run_dir) == before


def _must_not_load(*_args, **_kwargs):
    raise AssertionError("the model was loaded before the input was checked")


def test_foreign_files_inside_an_owned_run_are_named_and_kept(run_files, capsys):
    config, cfg, run_dir = write_config(run_files, "owned", "optim.max_steps=2")
    train(cfg, **tf.QUIET)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"note": "added by hand"}\n')
    before = tf.snapshot(run_dir)
    err = tf.refused(["train", str(config)], capsys)
    assert "metrics.jsonl line" in err and "is not a lora-jax record" in err
    assert tf.snapshot(run_dir) == before
    (run_dir / "metrics.jsonl").write_text(before["metrics.jsonl"].decode().rsplit('{"note"', 1)[0])
    (run_dir / "checkpoints" / "7").mkdir()
    (run_dir / "checkpoints" / "7" / "notes.txt").write_text("mine")
    before = tf.snapshot(run_dir)
    err = tf.refused(["train", str(config)], capsys)
    assert "checkpoints/7 is not a lora-jax checkpoint" in err and "move it out" in err
    assert tf.snapshot(run_dir) == before


@pytest.mark.parametrize("problem", ["is a file", "under a file", "read-only"])
def test_an_unusable_output_dir_is_found_before_the_model_loads(
    run_files, tmp_path, monkeypatch, capsys, problem
):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    target = {
        "is a file": blocker,
        "under a file": blocker / "run",
        "read-only": tmp_path / "ro" / "run",
    }[problem]
    if problem == "read-only":
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        if os.geteuid() == 0:  # root may write anywhere: let os.access answer as for a user
            access = os.access
            monkeypatch.setattr(
                os,
                "access",
                lambda p, mode: False if Path(p) == tmp_path / "ro" else access(p, mode),
            )
    config, _, _ = write_config(
        run_files, f"unusable_{problem.replace(' ', '_')}", f"output_dir={target}"
    )
    monkeypatch.setattr("models.load", _must_not_load)
    err = tf.refused(["train", str(config)], capsys)
    assert str(target) in err
    assert blocker.read_text() == "mine"


def test_a_learning_rate_far_too_high_stops_at_the_first_blown_up_update(run_files):
    model_dir, csv, root = run_files
    cfg = tf.tiny_config(
        model_dir,
        csv,
        root / "lr1e6",
        "optim.learning_rate=1e6",
        "optim.warmup_steps=0",
        "checkpoint.every_steps=1",
    )
    with pytest.raises(
        DivergenceError,
        match=r"diverged at step 1: parameters reached .*"
        r"No checkpoint was saved yet",
    ):
        train(cfg, **tf.QUIET)
    assert not (root / "lr1e6" / "checkpoints").exists() or not any(
        (root / "lr1e6" / "checkpoints").iterdir()
    )
    assert not (root / "lr1e6" / "adapter").exists()


def test_divergence_keeps_the_last_good_checkpoint_and_a_sane_rerun_trains(run_files):
    model_dir, csv, root = run_files
    run_dir = root / "diverge_later"
    sane = tf.tiny_config(
        model_dir, csv, run_dir, "checkpoint.every_steps=1", "checkpoint.keep_last=1"
    )
    train(sane, stop_after=3, **tf.QUIET)
    wild = tf.tiny_config(
        model_dir,
        csv,
        run_dir,
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=1",
        "optim.learning_rate=1e6",
    )
    with pytest.raises(DivergenceError, match=r"at step 4: .*last checkpoint \(step 3 "):
        train(wild, force_resume=True, **tf.QUIET)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["3"]  # kept, not pruned
    finished = train(sane, **tf.QUIET)
    assert finished.step == 6
    assert finished.validation_after["loss"] < finished.validation_before["loss"]


def test_a_checkpoint_saved_after_divergence_is_refused_on_resume(run_files, monkeypatch):
    model_dir, csv, root = run_files
    run_dir = root / "old_version"
    cfg = tf.tiny_config(
        model_dir,
        csv,
        run_dir,
        "optim.learning_rate=1e6",
        "optim.max_steps=4",
        "checkpoint.every_steps=2",
    )
    # an older version, without the guard, saved the blown-up state
    monkeypatch.setattr(guard, "MAX_GROWTH", float("inf"))
    assert train(cfg, **tf.QUIET).step == 4  # and saved checkpoints 2 and 4
    monkeypatch.undo()
    before = tf.snapshot(run_dir)
    with pytest.raises(
        CheckpointError,
        match=r"checkpoints/4: its parameters reached "
        r".*had diverged before it was saved",
    ):
        train(cfg, **tf.QUIET)
    assert tf.snapshot(run_dir) == before


def test_a_run_stuck_at_ln_v_fails(run_files, tmp_path):
    """A base whose output head is zero predicts uniformly whatever LoRA does: loss ln V,
    gradient exactly zero. The run must fail, not exit 0 with a useless adapter."""
    _, csv, _ = run_files
    model_dir = tf.write_tiny_llama(tmp_path / "zero_head")
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors["lm_head.weight"] = np.zeros_like(tensors["lm_head.weight"])
    save_file(tensors, str(model_dir / "model.safetensors"))
    cfg = tf.tiny_config(model_dir, csv, tmp_path / "stuck")
    with pytest.raises(
        NoLearningError,
        match=r"learned nothing: its loss ended at 6.2383 "
        r"nats/token, ln V .*512-token",
    ):
        train(cfg, **tf.QUIET)
    assert not (tmp_path / "stuck" / "adapter").exists()
    assert (tmp_path / "stuck" / "checkpoints" / "6").is_dir()


def test_fresh_empties_only_a_run_directory_of_ours(run_files, tmp_path, capsys):
    config, cfg, run_dir = write_config(run_files, "fresh", "optim.max_steps=2")
    train(cfg, **tf.QUIET)
    (run_dir / "checkpoints" / "2").rename(run_dir / "checkpoints" / "1")  # a stale step
    assert main(["train", str(config), "--fresh"]) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2"]
    assert [r["step"] for r in metrics.read_records(run_dir / "metrics.jsonl")] == [0, 1, 2, 2]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("mine")
    assert "was not created by lora-jax" in tf.refused(
        ["train", str(config), f"output_dir={foreign}", "--fresh"], capsys
    )
    assert (foreign / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize("data", ["unset", "missing file"])
def test_missing_data_is_found_before_the_model_loads(
    run_files, tmp_path, monkeypatch, capsys, data
):
    path = "null" if data == "unset" else str(tmp_path / "nope.csv")
    config, _, _ = write_config(run_files, f"no_data_{data.replace(' ', '_')}", f"data.path={path}")
    monkeypatch.setattr("models.load", _must_not_load)
    err = tf.refused(["train", str(config)], capsys)
    assert ("data.path is not set" if data == "unset" else "nope.csv does not exist") in err
