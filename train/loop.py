"""The updates of a run: :func:`loop` from the restored step to the end, judging each
update (train/guard.py) before it may be checkpointed, logging, validating and stopping at a
step boundary on Ctrl-C (:class:`StopOnSigint`).

With ``lora.num_adapters = k > 1`` (train/bank.py) every adapter's update is judged by its
own guard; when one diverges the run stops as a single-adapter run does, the message naming
the adapter and its learning rate, and nothing of that step is saved for any adapter (the
adapters share a checkpoint). Metrics records of adapter j have the split
``<split>/adapter_<j>`` (train/bank.py ``adapter_split``).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from train import bank as bank_lib
from train import guard
from train import mesh as mesh_lib
from train.batching import TrainBatches
from train.checkpoint import Checkpoints
from train.errors import UserError
from train.metrics import MetricsLog, progress_bar
from train.setup import Setup, peak_learning_rates
from train.step import updates_done


class DivergenceError(UserError, FloatingPointError):
    """Training diverged (train/guard.py); the message names the step, the sign and what
    was kept."""


class NonFiniteLossError(DivergenceError):
    """The loss or the gradient norm became NaN/inf; the message names the step."""


class StopOnSigint:
    """While inside: the first Ctrl-C asks the loop to stop at the next step boundary (with
    a checkpoint); a second one interrupts at once. Only the main thread can take signals."""

    def __init__(self):
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nstopping at the next step boundary, with a checkpoint (Ctrl-C again to stop "
            "at once)",
            file=sys.stderr,
        )

    def everywhere(self) -> bool:
        """Has any process of the run been asked to stop? (all processes agree on the step)"""
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


def validate(
    s: Setup, state: Any, step: int, metrics_log: MetricsLog, log: Callable[[str], None]
) -> list[dict[str, float]] | None:
    """Each adapter's validation loss (train/setup.py ``Setup.validate``), logged."""
    results = s.validate(state["params"])
    for j, result in enumerate(results or []):
        metrics_log.write(step, split_of("validation", j, s), result)
        log(
            f"validation loss{adapter_label(j, s)} at step {step}: {result['loss']:.4f} "
            f"(perplexity {result['perplexity']:.2f})"
        )
    return results


def split_of(split: str, j: int, s: Setup) -> str:
    """The metrics split of adapter ``j``'s records: ``split`` itself for a single adapter."""
    return split if s.num_adapters == 1 else bank_lib.adapter_split(split, j)


def adapter_label(j: int, s: Setup) -> str:
    """`` of adapter j (optim.learning_rates[j] = r)`` when several adapters train, else
    nothing."""
    if s.num_adapters == 1:
        return ""
    return f" of adapter {j} (optim.learning_rates[{j}] = {peak_learning_rates(s.cfg)[j]:g})"


def per_adapter(device_metrics: dict[str, Any], k: int) -> list[dict[str, float]]:
    """The step's metrics (float32 [] each, or [k] with k adapters) as k dicts of floats."""
    host = {name: np.asarray(v).reshape(-1) for name, v in device_metrics.items()}
    return [{name: float(v[j]) for name, v in host.items()} for j in range(k)]


def loop(
    s: Setup,
    state: Any,
    stream: TrainBatches,
    end: int,
    checkpoints: Checkpoints,
    resolved: dict[str, Any],
    metrics_log: MetricsLog,
    main: bool,
    judges: list[guard.DivergenceGuard],
    stop: StopOnSigint,
) -> tuple[Any, list[dict[str, float]] | None]:
    """Updates from ``state["step"]`` to ``end`` (or to a Ctrl-C); a checkpoint every
    ``checkpoint.every_steps``, at ``end`` and where stopped. ``judges``: one guard per
    adapter. Returns (state, each adapter's metrics of the last update). Raises
    DivergenceError (nothing saved for that step)."""
    cfg = s.cfg
    step = updates_done(state)
    bar = progress_bar(s.steps, step, main)
    windows: list[list[float]] = [[] for _ in judges]
    window_s: list[float] = []
    clock = time.perf_counter()
    metrics: list[dict[str, float]] | None = None
    try:
        while step < end:
            local = stack([next(stream) for _ in range(cfg.optim.grad_accum_steps)])
            state, device_metrics = s.step_fn(state, s.frozen, mesh_lib.put_batch(local, s.mesh))
            metrics = per_adapter(device_metrics, s.num_adapters)
            step += 1
            for j, (judge, adapter_metrics) in enumerate(zip(judges, metrics, strict=True)):
                reason = judge.check(adapter_metrics)
                if reason:
                    error = (
                        NonFiniteLossError if reason.startswith("the loss is") else DivergenceError
                    )
                    reason = f"{reason}{adapter_label(j, s)}"
                    raise error(divergence_message(reason, step, checkpoints))
            now = time.perf_counter()
            step_s, clock = max(now - clock, 1e-9), now
            tokens_per_s = metrics[0]["tokens"] / step_s  # every adapter reads the same rows
            for window, adapter_metrics in zip(windows, metrics, strict=True):
                window.append(adapter_metrics["loss"])
            window_s.append(step_s)
            losses = "/".join(f"{m['loss']:.4f}" for m in metrics)
            bar.set_postfix(loss=losses, tok_s=f"{tokens_per_s:,.0f}")
            bar.update(1)
            if step % cfg.logging.every_steps == 0 or step == end:
                for j, (window, adapter_metrics) in enumerate(zip(windows, metrics, strict=True)):
                    metrics_log.write(
                        step,
                        split_of("train", j, s),
                        {
                            "loss": float(np.mean(window)),
                            "grad_norm": adapter_metrics["grad_norm"],
                            "learning_rate": float(s.learning_rates[j](step - 1)),
                            "tokens_per_s": tokens_per_s,
                            "step_s": float(np.median(window_s)),
                            "epoch": stream.position.epoch,
                        },
                    )
                windows, window_s = [[] for _ in judges], []
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < end:
                validate(s, state, step, metrics_log, bar.write)
            stopping = stop.everywhere()
            if (
                step == end
                or stopping
                or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)
            ):
                checkpoints.save(step, state, stream.position, resolved)
            if stopping:
                break
    finally:
        bar.close()
    return state, metrics


def stack(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``count`` batches of ``[rows, L]`` -> one of ``[count, rows, L]`` per field."""
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def divergence_message(reason: str, step: int, checkpoints: Checkpoints) -> str:
    checkpoints.wait()
    latest = checkpoints.latest_step()
    kept = (
        f"The last checkpoint (step {latest} in {checkpoints.directory}) was taken before "
        f"this and passed the same checks; rerunning resumes from it"
        if latest is not None
        else "No checkpoint was saved yet"
    )
    return (
        f"training diverged at step {step}: {reason}; it stopped and this step was not "
        f"saved. {kept}. Lower optim.learning_rate, keep optim.grad_clip set, or check the "
        f"data (a changed config needs --force-resume to resume)"
    )
