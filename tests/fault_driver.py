"""``python tests/fault_driver.py FAULT lora-jax-args...``: ``lora-jax`` with one fault planted.

The fault strikes this process at a chosen moment of a ``lora-jax train`` run, from the
inside, so the moment is exact and the same on any machine:

* ``kill-after-setup``: SIGKILL once the model is loaded and compiled, before any write
  of the run but its mark and lock;
* ``kill-in-metrics-write``: SIGKILL half-way through writing the step-2 record (a torn
  last line of metrics.jsonl);
* ``kill-in-checkpoint-save``: SIGKILL just after the step-2 checkpoint save started
  (orbax's asynchronous write still in flight);
* ``kill-after-checkpoint``: SIGKILL once the step-2 checkpoint is complete;
* ``kill-in-adapter-save``: SIGKILL in the middle of writing the final adapter;
* ``kill-in-final-validation``: SIGKILL during the validation after the last update;
* ``sigint-at-step-2``: one Ctrl-C (SIGINT) during step 2;
* ``double-sigint-at-step-2``: two Ctrl-C during step 2 (the second stops at once);
* ``hold-at-step-1``: after step 1, wait until the file named by ``$FAULT_RELEASE`` exists
  (a run that holds its lock while a test starts a second one).

The driver patches the pipeline's own functions (``train.run``, ``train.setup``, ``train.metrics``,
``train.checkpoint``) and then runs ``train.cli.main`` unchanged.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _at_train_step(step: int, action) -> None:
    """Run ``action(metrics_log, record_text)`` instead of writing the train record of ``step``."""
    from train import metrics

    write = metrics.MetricsLog.write

    @functools.wraps(write)
    def patched(self, at, split, values):
        if at == step and split == "train":
            record = {"step": at, "split": split, **{k: float(v) for k, v in values.items()}}
            if action(self, json.dumps(record) + "\n"):
                return None
        return write(self, at, split, values)

    metrics.MetricsLog.write = patched


def plant(fault: str) -> None:
    from train import checkpoint, run

    if fault == "kill-after-setup":
        setup = run.setup
        run.setup = lambda *a, **k: (setup(*a, **k), _die())[0]
    elif fault == "kill-in-metrics-write":

        def torn(log, text):
            with log._path.open("a") as f:
                f.write(text[: len(text) // 2])
            _die()

        _at_train_step(2, torn)
    elif fault in ("kill-in-checkpoint-save", "kill-after-checkpoint"):
        save = checkpoint.Checkpoints.save

        def patched(self, step, *args, **kwargs):
            save(self, step, *args, **kwargs)
            if step == 2:
                if fault == "kill-after-checkpoint":
                    self.wait()
                _die()

        checkpoint.Checkpoints.save = patched
    elif fault == "kill-in-adapter-save":
        import orbax.checkpoint as ocp

        save = ocp.StandardCheckpointer.save

        def patched(self, *args, **kwargs):  # the weights are written, adapter.json is not
            save(self, *args, **kwargs)
            self.wait_until_finished()
            _die()

        ocp.StandardCheckpointer.save = patched
    elif fault == "kill-in-final-validation":
        from train import setup as setup_lib

        evaluate, calls = setup_lib.evaluate, []

        def patched(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # before training, then after the last update
                _die()
            return evaluate(*args, **kwargs)

        setup_lib.evaluate = patched
    elif fault in ("sigint-at-step-2", "double-sigint-at-step-2"):

        def interrupt(log, text):
            os.kill(os.getpid(), signal.SIGINT)
            if fault.startswith("double"):
                os.kill(os.getpid(), signal.SIGINT)
            return False

        _at_train_step(2, interrupt)
    elif fault == "hold-at-step-1":
        release = Path(os.environ["FAULT_RELEASE"])

        def hold(log, text):
            print("holding at step 1", flush=True)
            deadline = time.monotonic() + 120
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            return False

        _at_train_step(1, hold)
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    cache = os.environ.get("FAULT_JAX_CACHE")
    if cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    plant(sys.argv[1])
    from train.cli import main

    sys.exit(main(sys.argv[2:]))
