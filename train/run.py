"""One training run, start to end: :func:`train` (what ``lora-jax train`` calls).

:func:`train` first checks what it can without the model (the output directory can be
written, the LoRA targets compile), claims the run directory (train/rundir.py: a
directory that is not empty and not a lora-jax run is refused, untouched) and locks it.
train/setup.py loads the model and data, picks the trainable leaves (``method``), places
everything on the mesh and compiles the steps; :func:`train` then restores the latest
checkpoint (if any; it must be finite and sane, train/guard.py), validates, trains
(progress bar, metrics, periodic validation and checkpoints), validates again and writes
the adapter, the loss curve and greedy samples.

Every update is judged by train/guard.py before it can be saved (train/loop.py): a
non-finite or diverging update stops the run with ``loop.DivergenceError`` (nothing of
that step is saved, so the newest checkpoint is the last good one), and a run that ends
stuck at ln V raises :class:`NoLearningError`. Ctrl-C stops at the next step boundary with a
checkpoint (:class:`RunStopped`); a full disk becomes one :class:`rundir.DiskFullError`.

The run directory (``output_dir``) ends up as train/layout.py describes. With
``lora.num_adapters = k > 1`` (train/bank.py) the k adapters train together and each is
written as its own adapter directory ``adapter_<j>/`` (``run_info.json`` lists them with
their learning rates); no samples are generated (``lora-jax eval`` decodes each) and no
loss curve drawn (metrics.jsonl holds each adapter's records).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

import lora_jax as lj
from train import adapter as adapter_lib
from train import bank as bank_lib
from train import guard, layout, rundir
from train import loop as loop_lib
from train import mesh as mesh_lib
from train import method as method_lib
from train.batching import TrainBatches
from train.checkpoint import CheckpointError, Checkpoints, abstract_like, config_changes
from train.config import RunConfig, resolve_path, save_config
from train.data import check_source
from train.errors import UserError
from train.metrics import MetricsLog
from train.plot import plot_loss_curve
from train.samples import Sample, distinct_prompts, generate_samples
from train.setup import Setup, adapter_plans, config_dict, run_info, setup
from train.step import max_abs, updates_done


class NoLearningError(UserError, FloatingPointError):
    """The run ended stuck at ln V: it learned nothing and could not."""


class RunStopped(Exception):
    """Ctrl-C stopped the run at a step boundary, with a checkpoint there."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(f"stopped at step {step}; rerun the same command to resume")
        self.step, self.run_dir = step, run_dir


@dataclass
class AdapterResult:
    """One adapter of a run: where it is saved, how it was trained, how it validates."""

    directory: Path  # its adapter directory (written once the run has finished)
    learning_rate: float  # peak
    init_seed: int
    validation_before: dict[str, float] | None  # at the step the run (re)started from
    validation_after: dict[str, float] | None


@dataclass
class RunResult:
    """What a finished (or stopped) run leaves behind."""

    run_dir: Path
    step: int  # updates done
    # the adapter's validation (None with lora.num_adapters > 1: see ``adapters``)
    validation_before: dict[str, float] | None  # at the step the run (re)started from
    validation_after: dict[str, float] | None
    samples: list[Sample] = field(default_factory=list)
    state: Any = None  # the final train state (train/step.py)
    adapters: list[AdapterResult] = field(default_factory=list)  # one per adapter


def train(
    cfg: RunConfig,
    *,
    force_resume: bool = False,
    stop_after: int | None = None,
    fresh: bool = False,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Train as ``cfg`` says, resuming from the run's latest checkpoint if there is one.

    force_resume: resume even if the config changes the run (see train/checkpoint.py).
    stop_after: stop after this many updates (counted from step 0) with a checkpoint, as on
      a preemption; a later call continues exactly where it stopped.
    fresh: start over: empty the run directory (and ``checkpoint.dir``) first, which must be
      lora-jax's own (train/rundir.py ``clear``).
    """
    run_dir = resolve_path(cfg.output_dir)
    own_checkpoint_dir = cfg.checkpoint.dir is not None
    checkpoint_dir = (
        resolve_path(cfg.checkpoint.dir) if own_checkpoint_dir else run_dir / layout.CHECKPOINT_DIR
    )
    log(f"{cfg.method} fine-tuning of {cfg.model.name} into {run_dir}")
    rundir.check_writable(run_dir)
    if own_checkpoint_dir:
        rundir.check_writable(checkpoint_dir, "checkpoint directory")
    check_source(cfg.data)
    method_lib.check_targets(cfg)
    try:
        with contextlib.ExitStack() as cleanup:
            if jax.process_index() == 0:  # the other processes write only once it holds
                rundir.claim(run_dir, layout.Kind.RUN)
                lock = cleanup.enter_context(rundir.RunLock(run_dir))
                if lock.took_over:
                    log(
                        f"took over the lock of {run_dir} from process {lock.took_over['pid']}, "
                        f"which is no longer running"
                    )
                if own_checkpoint_dir:
                    rundir.claim(
                        checkpoint_dir, layout.Kind.CHECKPOINTS, what="checkpoint directory"
                    )
                if fresh:
                    rundir.clear(run_dir, layout.Kind.RUN)
                    if own_checkpoint_dir:
                        rundir.clear(checkpoint_dir, layout.Kind.CHECKPOINTS)
            return _run(cfg, run_dir, checkpoint_dir, cleanup, force_resume, stop_after, log)
    except Exception as e:
        if rundir.is_disk_full(e):
            raise rundir.DiskFullError(
                f"the disk is full (No space left on device) while writing {run_dir}"
                f"{'' if not own_checkpoint_dir else ' or ' + str(checkpoint_dir)}. Free space "
                f"and rerun the same command: it resumes from "
                f"{_latest_on_disk(checkpoint_dir)}"
            ) from e
        raise


def _latest_on_disk(checkpoint_dir: Path) -> str:
    """ "the checkpoint at step N (in DIR)", or "the start" without one."""
    steps = [int(p.name) for p in checkpoint_dir.glob("*") if p.name.isdigit()]
    return (
        f"the checkpoint at step {max(steps)} (in {checkpoint_dir})"
        if steps
        else "the start (no checkpoint was complete)"
    )


def _run(
    cfg: RunConfig,
    run_dir: Path,
    checkpoint_dir: Path,
    cleanup: contextlib.ExitStack,
    force_resume: bool,
    stop_after: int | None,
    log: Callable[[str], None],
) -> RunResult:
    """:func:`train` inside a claimed, locked run directory; ``cleanup`` closes what it opens."""
    s = setup(cfg, log)
    main = jax.process_index() == 0
    checkpoints = Checkpoints(
        checkpoint_dir, keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save
    )
    cleanup.callback(checkpoints.close)  # pending saves finish on any exit
    resolved = config_dict(cfg)
    start_max_abs = _max_abs(s, s.state["params"])
    state, stream = _restore_latest(s, checkpoints, resolved, force_resume, start_max_abs, log)
    if main:
        save_config(cfg, run_dir / layout.CONFIG_FILE)
        (run_dir / layout.RUN_INFO_FILE).write_text(json.dumps(run_info(s), indent=1) + "\n")
    start = updates_done(state)
    metrics_log = MetricsLog(
        run_dir,
        jsonl=cfg.logging.jsonl,
        tensorboard=cfg.logging.tensorboard,
        resume_step=start,
        enabled=main,
        log=log,
    )
    cleanup.callback(metrics_log.close)
    before = loop_lib.validate(s, state, start, metrics_log, log)
    end = s.steps if stop_after is None else min(s.steps, stop_after)
    with loop_lib.StopOnSigint() as stop:
        state, last = loop_lib.loop(
            s,
            state,
            stream,
            end,
            checkpoints,
            resolved,
            metrics_log,
            main,
            [guard.DivergenceGuard(start) for start in start_max_abs],
            stop,
        )
    checkpoints.wait()
    step = updates_done(state)
    if step < end:  # Ctrl-C
        raise RunStopped(step, run_dir)
    vocab = s.model.config.vocab_size
    for j, adapter_last in enumerate(last if step == s.steps and last else []):
        if guard.never_learned(adapter_last["loss"], adapter_last["grad_norm"], vocab):
            raise NoLearningError(_no_learning_message(adapter_last, j, s, checkpoints))
    after = loop_lib.validate(s, state, step, metrics_log, log)
    samples = _finish(s, state, run_dir, log) if step == s.steps else []
    if main:
        plot_loss_curve(
            metrics_log.records,
            run_dir / layout.LOSS_CURVE_FILE,
            f"{cfg.method} fine-tuning of {Path(cfg.model.name).name}",
        )
    adapters = [
        AdapterResult(run_dir / a.directory, a.learning_rate, a.init_seed, *validations)
        for a, *validations in zip(
            adapter_plans(cfg),
            before or [None] * s.num_adapters,
            after or [None] * s.num_adapters,
            strict=True,
        )
    ]
    single = s.num_adapters == 1
    return RunResult(
        run_dir,
        step,
        adapters[0].validation_before if single else None,
        adapters[0].validation_after if single else None,
        samples,
        state,
        adapters,
    )


def _max_abs(s: Setup, trainable: Any) -> list[float]:
    """max |x| over each adapter's part of ``trainable`` (global arrays on ``s.mesh``;
    for methods other than LoRA, the whole), as host floats on every process."""
    each = (
        max_abs
        if s.axes is None
        else functools.partial(bank_lib.max_abs_each, axes=s.axes["params"])
    )
    found = jax.jit(each, out_shardings=mesh_lib.replicated(s.mesh))(trainable)
    return [float(x) for x in np.asarray(found).reshape(-1)]


def _restore_latest(
    s: Setup,
    checkpoints: Checkpoints,
    resolved: dict[str, Any],
    force: bool,
    start_max_abs: list[float],
    log: Callable[[str], None],
) -> tuple[Any, TrainBatches]:
    """(state, stream) at the latest checkpoint, after checking the config and that its
    parameters are finite and sane (train/guard.py); else the start."""
    step = checkpoints.latest_step()
    if step is None:
        return s.state, s.stream()
    changes = config_changes(checkpoints.restore_meta(step)["config"], resolved)
    if changes and not force:
        raise CheckpointError(
            f"cannot resume from {checkpoints.directory / str(step)}: the config changes the "
            f"run ({'; '.join(changes)}). Restore those values, use a new output_dir, or pass "
            f"--force-resume to continue anyway"
        )
    state, position = checkpoints.restore(step, abstract_like(s.state, s.state_shardings))
    found = _max_abs(s, state["params"])
    reasons = [guard.blow_up(x, start) for x, start in zip(found, start_max_abs, strict=True)]
    reason = next((f"{r}{loop_lib.adapter_label(j, s)}" for j, r in enumerate(reasons) if r), None)
    if reason:
        raise CheckpointError(
            f"cannot resume from {checkpoints.directory / str(step)}: its {reason}, so training "
            f"had diverged before it was saved. Move it out of {checkpoints.directory} to "
            f"resume from an earlier checkpoint, or start a new run with another output_dir"
        )
    log(f"resumed from {checkpoints.directory / str(step)} (next batch: {position})")
    return state, s.stream(position)


def _no_learning_message(last: dict[str, float], j: int, s: Setup, checkpoints: Checkpoints) -> str:
    vocab = s.model.config.vocab_size
    return (
        f"the run learned nothing: "
        f"{'its loss' if s.num_adapters == 1 else 'the loss' + loop_lib.adapter_label(j, s)} "
        f"ended at {last['loss']:.4f} nats/token, ln V "
        f"(a uniform guess over the {vocab:,}-token vocabulary), with gradient norm "
        f"{last['grad_norm']:.2g}, so no learning rate can move it. No adapter was written; "
        f"the checkpoints in {checkpoints.directory} are kept. Check model.name (is the "
        f"base model's output head all zeros?) and optim.learning_rate"
    )


def _finish(s: Setup, state: Any, run_dir: Path, log: Callable[[str], None]) -> list[Sample]:
    """Write the adapter directory (one per adapter); return greedy samples (single-process
    runs of one adapter)."""
    cfg = s.cfg
    final = lj.combine(s.frozen, state["params"])
    lora = method_lib.lora_config(cfg.lora).to_dict() if cfg.method == "lora" else None
    save = functools.partial(
        adapter_lib.save_adapter,
        method=cfg.method,
        model_name=cfg.model.name,
        lora=lora,
        base_fingerprint=adapter_lib.fingerprint(s.base),
        model_options=dataclasses.asdict(cfg.model),
    )
    if s.num_adapters > 1:
        for j, a in enumerate(adapter_plans(cfg)):
            # adapter j alone, as a run of one adapter holds it: its A, B and scales
            params = lj.combine(s.base, lj.unstack(final, j))
            mask = lj.trainable_mask(params)
            extra = {
                "learning_rate": a.learning_rate,
                "init_seed": a.init_seed,
                "trained_with_adapters": s.num_adapters,
            }
            saved = save(
                run_dir / a.directory, adapter_lib.artifact(params, mask, s.base), extra=extra
            )
            log(f"adapter {j} (learning rate {a.learning_rate:g}): {saved}")
        return []
    if method_lib.trains_residual_base(cfg):
        # trained on the residual base: saved as the rank-2r adapter of the original one
        # (factors of rank 2r; adapter.json's "lora" stays the run's config)
        original = method_lib.for_original_base(cfg, s.base, final)
        save = functools.partial(save, extra={"converted_from": cfg.lora.init})
        artifact = adapter_lib.artifact(original, lj.trainable_mask(original), s.base)
    else:
        artifact = adapter_lib.artifact(final, s.mask, s.base)
    saved = save(run_dir / layout.ADAPTER_DIR, artifact)
    log(f"adapter: {saved}")
    if not cfg.eval.samples or jax.process_count() > 1:
        return []
    return generate_samples(
        s.model,
        final,
        s.tokenizer,
        distinct_prompts(s.splits.validation, cfg.eval.samples),
        s.splits.pad_id,
        cfg.eval.max_new_tokens,
        method_lib.decoding_apply(cfg.method, s.model.apply),
    )
