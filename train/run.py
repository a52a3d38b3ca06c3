"""One training run, start to end: :func:`train` (what ``lora-jax train`` calls).

:func:`train` first checks what it can without the model (the output directory can be
written, the LoRA targets compile), claims the run directory (train/rundir.py: a
directory that is not empty and not a lora-jax run is refused, untouched) and locks it.
:func:`setup` loads the model and data, picks the trainable leaves (``method``), places
everything on the mesh and compiles the steps; :func:`train` then restores the latest
checkpoint (if any; it must be finite and sane, train/guard.py), validates, trains
(progress bar, metrics, periodic validation and checkpoints), validates again and writes
the adapter, the loss curve and greedy samples.

Every update is judged by train/guard.py before it can be saved: a non-finite or
diverging update stops the run with :class:`DivergenceError` (nothing of that step is
saved, so the newest checkpoint is the last good one), and a run that ends stuck at ln V
raises :class:`NoLearningError`. Ctrl-C stops at the next step boundary with a
checkpoint (:class:`RunStopped`); a full disk becomes one :class:`rundir.DiskFullError`.

The run directory (``output_dir``) ends up as train/layout.py describes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from omegaconf import OmegaConf
from tokenizers import Tokenizer

import lora_jax as lj
import models
from train import adapter as adapter_lib
from train import guard, layout, rundir
from train import mesh as mesh_lib
from train import method as method_lib
from train.batching import START, DataPosition, TrainBatches
from train.checkpoint import CheckpointError, Checkpoints, abstract_like, config_changes
from train.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    resolve_path,
    save_config,
)
from train.data import Splits, build_splits, check_source, train_batches, validation_batches
from train.errors import UserError
from train.evaluate import evaluate
from train.metrics import MetricsLog, progress_bar
from train.optim import optimizer, schedule, total_steps
from train.plot import plot_loss_curve
from train.samples import Sample, distinct_prompts, generate_samples
from train.step import eval_step, init_state, max_abs, train_step


class DivergenceError(UserError, FloatingPointError):
    """Training diverged (train/guard.py); the message names the step, the sign and what
    was kept."""


class NonFiniteLossError(DivergenceError):
    """The loss or the gradient norm became NaN/inf; the message names the step."""


class NoLearningError(UserError, FloatingPointError):
    """The run ended stuck at ln V: it learned nothing and could not."""


class RunStopped(Exception):
    """Ctrl-C stopped the run at a step boundary, with a checkpoint there."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(f"stopped at step {step}; rerun the same command to resume")
        self.step, self.run_dir = step, run_dir


@dataclass
class RunResult:
    """What a finished (or stopped) run leaves behind."""

    run_dir: Path
    step: int  # updates done
    validation_before: dict[str, float] | None  # at the step the run (re)started from
    validation_after: dict[str, float] | None
    samples: list[Sample] = field(default_factory=list)
    state: Any = None  # the final train state (train/step.py)


@dataclass
class Setup:
    """Everything a run needs, placed on the mesh and compiled; built by :func:`setup`."""

    cfg: RunConfig
    model: models.Decoder
    tokenizer: Tokenizer
    splits: Splits
    mesh: Mesh
    base: Any  # the base params as loaded (host)
    mask: Any  # trainable mask over the params trained from (adapted for LoRA)
    frozen: Any  # the frozen half, on the mesh
    state: Any  # the initial train state, on the mesh
    steps: int  # optimizer updates in the whole run
    step_fn: Callable[..., Any]  # jitted train_step(state, frozen, batches_KxBxL)
    eval_fn: Callable[..., Any]  # jitted eval_step(trainable, frozen, batch_BxL)

    @property
    def state_shardings(self) -> Any:
        """The train state's shardings (train/mesh.py ``state_shardings``)."""
        return jax.tree.map(lambda x: x.sharding, self.state)

    @property
    def learning_rate(self) -> optax.Schedule:
        """The learning rate per update (train/optim.py ``schedule``)."""
        return schedule(self.cfg.optim, self.steps)

    def stream(self, position: DataPosition = START) -> TrainBatches:
        """This process's training stream, from ``position`` (default: the start)."""
        return train_batches(
            self.splits,
            self.cfg.data,
            seed=self.cfg.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            position=position,
        )

    def validate(self, trainable: Any) -> dict[str, float] | None:
        """Validation loss/perplexity of ``trainable``; None without validation data."""
        if not self.splits.validation:
            return None
        batches = validation_batches(
            self.splits,
            self.cfg.data,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_batches=self.cfg.eval.num_batches,
        )
        return evaluate(self.eval_fn, trainable, self.frozen, batches, self.mesh)


def run_info(s: Setup) -> dict[str, Any]:
    """What the method costs in parameters and optimizer memory, counted from the arrays.

    ``base_params``: elements of the base model; ``trainable_params``: elements the
    optimizer updates (LoRA factors and bias deltas, every parameter, or the biases);
    ``added_params``: elements the method adds beside the base (LoRA factors, scales,
    deltas); ``optimizer_state_bytes``: bytes of the optimizer state (AdamW: two moments
    per trainable element, plus step counters); ``data``: what became of the rows and
    how they split (train/data.py ``DataReport``).
    """
    base, trainable = _size(s.base), _size(s.state["params"])
    return {
        "method": s.cfg.method,
        "base_params": base,
        "trainable_params": trainable,
        "added_params": _size(s.frozen) + trainable - base,
        "optimizer_state_bytes": sum(x.nbytes for x in jax.tree.leaves(s.state["opt_state"])),
        "data": dataclasses.asdict(s.splits.report),
    }


def _size(tree: Any) -> int:
    """Elements in ``tree``'s arrays."""
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-ready containers."""
    return json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg))))


def load_model(cfg: ModelConfig) -> tuple[models.Decoder, Any, Tokenizer]:
    """``models.load`` with the config's options (train/method.py ``model_options``, as
    ``check_targets`` reads them); the tokenizer must exist."""
    model, params, tokenizer = models.load(cfg.name, **method_lib.model_options(cfg))
    if cfg.add_biases and model.config.family != "llama":
        raise ConfigError(
            f"model.add_biases=true adds biases to a bias-free Llama model, but "
            f"{cfg.name!r} is {model.config.family}, which has biases on every "
            f"projection already; remove model.add_biases"
        )
    if tokenizer is None:
        raise ConfigError(
            f"model {cfg.name!r} ships no tokenizer (tokenizer.json); add one to "
            f"the checkpoint directory"
        )
    return model, params, tokenizer


def setup(cfg: RunConfig, log: Callable[[str], None] = print) -> Setup:
    """Load, split, place and compile; nothing is written."""
    mesh = mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_batch_fits(cfg.data.batch_size, mesh)
    model, base, tokenizer = load_model(cfg.model)
    splits = build_splits(cfg.data, tokenizer, cfg.seed, model.config.eos_token_id)
    log(f"data: {splits.report.summary()}")

    init_key, dropout_key = jax.random.split(jax.random.key(cfg.seed))
    params, mask = method_lib.prepare(cfg.method, base, cfg.lora, init_key)
    shardings = mesh_lib.param_shardings(models.logical_axes(model), params, mesh)
    frozen, trainable = lj.split(mesh_lib.place(params, shardings), mask)
    frozen_sh, trainable_sh = lj.split(shardings, mask)
    n_trainable, n_all = _size(trainable), _size(params)
    log(
        f"method {cfg.method}: {n_trainable:,} trainable of {n_all:,} parameters "
        f"({100 * n_trainable / n_all:.3f}%); mesh {dict(mesh.shape)}"
    )

    batches_per_epoch = train_batches(splits, cfg.data, seed=cfg.seed).steps_in_epoch(0)
    steps = total_steps(cfg.optim, batches_per_epoch)
    # the method's mask selects every leaf of the trainable half (train/method.py MASKS)
    tx = lj.optimizer(optimizer(cfg.optim, steps), trainable, method_lib.MASKS[cfg.method])
    state_sh = mesh_lib.state_shardings(tx, trainable, trainable_sh, mesh)
    state = jax.jit(lambda p, key: init_state(p, tx, key), out_shardings=state_sh)(
        trainable, dropout_key
    )

    forward = method_lib.forward(cfg.method, model.apply, cfg.lora.dropout)
    replicated = mesh_lib.replicated(mesh)
    batch_sh = mesh_lib.batch_sharding(mesh, 3)
    step_fn = jax.jit(
        train_step(forward, tx, cfg.optim.label_smoothing),
        in_shardings=(state_sh, frozen_sh, batch_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
    eval_fn = jax.jit(
        eval_step(forward),
        in_shardings=(trainable_sh, frozen_sh, mesh_lib.batch_sharding(mesh, 2)),
        out_shardings=replicated,
    )
    return Setup(
        cfg, model, tokenizer, splits, mesh, base, mask, frozen, state, steps, step_fn, eval_fn
    )


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
    start_max_abs = _max_abs(s.state["params"], s.mesh)
    state, stream = _restore_latest(s, checkpoints, resolved, force_resume, start_max_abs, log)
    if main:
        save_config(cfg, run_dir / layout.CONFIG_FILE)
        (run_dir / layout.RUN_INFO_FILE).write_text(json.dumps(run_info(s), indent=1) + "\n")
    start = int(state["step"])
    metrics_log = MetricsLog(
        run_dir,
        jsonl=cfg.logging.jsonl,
        tensorboard=cfg.logging.tensorboard,
        resume_step=start,
        enabled=main,
        log=log,
    )
    cleanup.callback(metrics_log.close)
    before = _validate(s, state, start, metrics_log, log)
    end = s.steps if stop_after is None else min(s.steps, stop_after)
    with _StopOnSigint() as stop:
        state, last = _loop(
            s,
            state,
            stream,
            end,
            checkpoints,
            resolved,
            metrics_log,
            main,
            guard.DivergenceGuard(start_max_abs),
            stop,
        )
    checkpoints.wait()
    step = int(state["step"])
    if step < end:  # Ctrl-C
        raise RunStopped(step, run_dir)
    if (
        step == s.steps
        and last is not None
        and guard.never_learned(last["loss"], last["grad_norm"], s.model.config.vocab_size)
    ):
        raise NoLearningError(_no_learning_message(last, s, checkpoints))
    after = _validate(s, state, step, metrics_log, log)
    samples = _finish(s, state, run_dir, log) if step == s.steps else []
    if main:
        plot_loss_curve(
            metrics_log.records,
            run_dir / layout.LOSS_CURVE_FILE,
            f"{cfg.method} fine-tuning of {Path(cfg.model.name).name}",
        )
    return RunResult(run_dir, step, before, after, samples, state)


def _max_abs(tree: Any, mesh: Mesh) -> float:
    """max |x| over ``tree`` (global arrays on ``mesh``), as a host float on every process."""
    return float(jax.jit(max_abs, out_shardings=mesh_lib.replicated(mesh))(tree))


class _StopOnSigint:
    """While inside: the first Ctrl-C asks the loop to stop at the next step boundary (with
    a checkpoint); a second one interrupts at once. Only the main thread can take signals."""

    def __init__(self):
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnSigint:
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


def _restore_latest(
    s: Setup,
    checkpoints: Checkpoints,
    resolved: dict[str, Any],
    force: bool,
    start_max_abs: float,
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
    reason = guard.blow_up(_max_abs(state["params"], s.mesh), start_max_abs)
    if reason:
        raise CheckpointError(
            f"cannot resume from {checkpoints.directory / str(step)}: its {reason}, so training "
            f"had diverged before it was saved. Move it out of {checkpoints.directory} to "
            f"resume from an earlier checkpoint, or start a new run with another output_dir"
        )
    log(f"resumed from {checkpoints.directory / str(step)} (next batch: {position})")
    return state, s.stream(position)


def _validate(
    s: Setup, state: Any, step: int, metrics_log: MetricsLog, log: Callable[[str], None]
) -> dict[str, float] | None:
    result = s.validate(state["params"])
    if result is not None:
        metrics_log.write(step, "validation", result)
        log(
            f"validation loss at step {step}: {result['loss']:.4f} "
            f"(perplexity {result['perplexity']:.2f})"
        )
    return result


def _loop(
    s: Setup,
    state: Any,
    stream: TrainBatches,
    end: int,
    checkpoints: Checkpoints,
    resolved: dict[str, Any],
    metrics_log: MetricsLog,
    main: bool,
    judge: guard.DivergenceGuard,
    stop: _StopOnSigint,
) -> tuple[Any, dict[str, float] | None]:
    """Updates from ``state["step"]`` to ``end`` (or to a Ctrl-C); a checkpoint every
    ``checkpoint.every_steps``, at ``end`` and where stopped. Returns (state, the last
    update's metrics). Raises DivergenceError (nothing saved for that step)."""
    cfg = s.cfg
    step = int(state["step"])
    bar = progress_bar(s.steps, step, main)
    window: list[float] = []
    window_s: list[float] = []
    clock = time.perf_counter()
    metrics: dict[str, float] | None = None
    try:
        while step < end:
            local = _stack([next(stream) for _ in range(cfg.optim.grad_accum_steps)])
            state, device_metrics = s.step_fn(state, s.frozen, mesh_lib.put_batch(local, s.mesh))
            metrics = {k: float(np.asarray(v)) for k, v in device_metrics.items()}
            step += 1
            reason = judge.check(metrics)
            if reason:
                error = NonFiniteLossError if reason.startswith("the loss is") else DivergenceError
                raise error(_divergence_message(reason, step, checkpoints))
            now = time.perf_counter()
            step_s, clock = max(now - clock, 1e-9), now
            tokens_per_s = metrics["tokens"] / step_s
            window.append(metrics["loss"])
            window_s.append(step_s)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            bar.update(1)
            if step % cfg.logging.every_steps == 0 or step == end:
                metrics_log.write(
                    step,
                    "train",
                    {
                        "loss": float(np.mean(window)),
                        "grad_norm": metrics["grad_norm"],
                        "learning_rate": float(s.learning_rate(step - 1)),
                        "tokens_per_s": tokens_per_s,
                        "step_s": float(np.median(window_s)),
                        "epoch": stream.position.epoch,
                    },
                )
                window, window_s = [], []
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < end:
                _validate(s, state, step, metrics_log, bar.write)
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


def _stack(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``count`` batches of ``[rows, L]`` -> one of ``[count, rows, L]`` per field."""
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _divergence_message(reason: str, step: int, checkpoints: Checkpoints) -> str:
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


def _no_learning_message(last: dict[str, float], s: Setup, checkpoints: Checkpoints) -> str:
    vocab = s.model.config.vocab_size
    return (
        f"the run learned nothing: its loss ended at {last['loss']:.4f} nats/token, ln V "
        f"(a uniform guess over the {vocab:,}-token vocabulary), with gradient norm "
        f"{last['grad_norm']:.2g}, so no learning rate can move it. No adapter was written; "
        f"the checkpoints in {checkpoints.directory} are kept. Check model.name (is the "
        f"base model's output head all zeros?) and optim.learning_rate"
    )


def _finish(s: Setup, state: Any, run_dir: Path, log: Callable[[str], None]) -> list[Sample]:
    """Write the adapter directory; return greedy samples (single-process runs)."""
    cfg = s.cfg
    final = lj.combine(s.frozen, state["params"])
    lora = method_lib.lora_config(cfg.lora).to_dict() if cfg.method == "lora" else None
    saved = adapter_lib.save_adapter(
        run_dir / layout.ADAPTER_DIR,
        adapter_lib.artifact(final, s.mask, s.base),
        method=cfg.method,
        model_name=cfg.model.name,
        lora=lora,
        base_fingerprint=adapter_lib.fingerprint(s.base),
        model_options=dataclasses.asdict(cfg.model),
    )
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
    )
