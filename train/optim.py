"""The optimizer: global-norm clipping, then AdamW on a warmup + decay schedule.

A *step* is one optimizer update; with ``optim.grad_accum_steps = k`` it consumes k
data batches (the train step accumulates their gradients itself, see train/step.py).
Weight decay applies to matrices only (leaves with two or more axes: kernels,
embeddings, LoRA factors), not to biases, norm scales or other vectors.
"""

from __future__ import annotations

import jax
import optax

from train.config import OptimConfig


def total_steps(cfg: OptimConfig, batches_per_epoch: int) -> int:
    """Optimizer updates in the run: ``max_steps`` when set, else whole epochs."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, cfg.epochs * batches_per_epoch // cfg.grad_accum_steps)


def schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """Learning rate per update: linear warmup from 0 over ``warmup_steps``, then
    ``linear`` decay to 0 at ``steps``, ``cosine`` decay to 0, or ``constant``."""
    warmup = min(cfg.warmup_steps, steps)
    peak = cfg.learning_rate
    decay_steps = max(steps - warmup, 1)
    after = {
        "linear": optax.linear_schedule(peak, 0.0, decay_steps),
        "cosine": optax.cosine_decay_schedule(peak, decay_steps),
        "constant": optax.constant_schedule(peak),
    }[cfg.schedule]
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    """Clip (if ``grad_clip``) then AdamW; for the trainable parameters only."""
    adamw = optax.adamw(
        schedule(cfg, steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params),
    )
    if cfg.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
