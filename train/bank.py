"""k LoRA adapters trained together on one frozen base (``lora.num_adapters = k > 1``).

The params hold a bank (``lj.stack``'s layout, made by train/method.py ``prepare``): beside
each target weight ``<w>_bank_a`` and ``<w>_bank_b`` (trainable) and ``<w>_bank_scale``,
``<w>_bank_rank`` (frozen), the adapter axis right after the weight's stacked axes. The
train state is a single adapter's (train/step.py) with that adapter axis in every leaf:
the bank's factors and their AdamW moments at the factors' adapter axis, and the step,
the dropout key and the optimizer's step counts on a leading axis of size k.

One update is ``jax.vmap`` of the single-adapter train step (train/step.py ``train_step``)
over the adapter axis. Adapter j sees its slice of the bank renamed to one adapter's
leaves (``<w>_lora_a/_lora_b/_lora_scale``), every row of the global batch, and computes
its own loss (nats per target token of the batch), gradient, global-norm clip, AdamW
moments and learning-rate schedule (peak ``optim.learning_rates[j]``). vmap computes each
slice as the function computes it alone, so adapter j's update is the one its separate
run makes from the same state: the run with ``lora.num_adapters=1``,
``optim.learning_rate=learning_rates[j]``, ``lora.init_seeds=[init_seeds[j]]`` and the same
``seed`` (the same data order; the same dropout masks, the dropout key coming from
``seed``), up to the order XLA sums floats in. It is the sum over adapters of each
adapter's mean loss, differentiated: adapter j's loss depends on its slice alone. The
cost is that of k·B rows: the base's matmuls run once on the k copies of the batch, the
factors' per adapter, with no per-row gather of factors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from train import step as step_lib

# lj's leaf names (lora_jax/_tree.py): a bank's part -> the single adapter's leaf
SINGLE = {"_bank_a": "_lora_a", "_bank_b": "_lora_b", "_bank_scale": "_lora_scale"}
RANK = "_bank_rank"  # the bank's per-slot ranks: no single adapter has one
SCALE = "_bank_scale"


def adapter_dir_name(j: int) -> str:
    """The run directory's subdirectory that holds adapter ``j``'s adapter directory, beside
    the run's config.yaml (k = 1 runs write theirs to ``adapter/``, train/layout.py)."""
    return f"adapter_{j}"


def adapter_split(split: str, j: int) -> str:
    """The metrics.jsonl split of adapter ``j``'s ``train`` or ``validation`` records."""
    return f"{split}/adapter_{j}"


def _bank_suffix(path: str) -> str | None:
    """The bank part ``path`` names (``_bank_a``, ...), or None for any other leaf."""
    return next((s for s in (*SINGLE, RANK) if path.endswith(s)), None)


def adapter_axes(tree: Any, params: Any) -> Any:
    """``tree`` (``params`` or a half ``lj.split`` cut from it, arrays or shapes) with each
    leaf replaced by its adapter axis: the number of stacked axes of its weight (its
    ``_bank_scale``'s rank - 1) for a bank part, None (no adapter axis) for any other."""
    flat_params = lj.flatten_paths(params)

    def axis(path: str) -> int | None:
        suffix = _bank_suffix(path)
        if suffix is None:
            return None
        return flat_params[path[: -len(suffix)] + SCALE].ndim - 1

    return lj.unflatten_paths({p: axis(p) for p in lj.flatten_paths(tree)}, like=tree)


def as_adapter(params: Any) -> Any:
    """One slot of a bank (its adapter axis taken away by vmap) as one adapter's leaves:
    ``<w>_bank_a/_b/_scale`` renamed ``<w>_lora_a/_b/_scale``, the ranks left out (every
    slot has the rank of ``lora``), every other leaf as it is."""
    renamed = {}
    for path, leaf in lj.flatten_paths(params).items():
        suffix = _bank_suffix(path)
        if suffix != RANK:
            renamed[path if suffix is None else path[: -len(suffix)] + SINGLE[suffix]] = leaf
    return lj.unflatten_paths(renamed, like=params)


def combine_slot(frozen: Any, trainable: Any) -> Any:
    """``lj.combine`` of the halves of one slot of a bank, as one adapter's params."""
    return lj.combine(as_adapter(frozen), as_adapter(trainable))


def slot(tree: Any, axes: Any, j: jax.Array) -> Any:
    """Slot ``j`` (may be traced) of every banked leaf of ``tree`` (``axes``: its
    :func:`adapter_axes`); other leaves as they are."""
    flat_axes = lj.flatten_paths(axes)
    return lj.unflatten_paths(
        {
            p: x if flat_axes[p] is None else jnp.take(x, j, axis=flat_axes[p])
            for p, x in lj.flatten_paths(tree).items()
        },
        like=tree,
    )


def state_axes(tx: optax.GradientTransformation, trainable: Any, trainable_axes: Any) -> dict:
    """The adapter axis of every leaf of the train state (:func:`init_state`): a moment
    of ``tx`` has its factor's, the step, the dropout key and the step counts 0."""
    opt_axes = optax.tree_map_params(
        tx,
        lambda _, axis: axis,
        jax.eval_shape(tx.init, trainable),
        trainable_axes,
        transform_non_params=lambda _: 0,
    )
    return {"step": 0, "params": trainable_axes, "opt_state": opt_axes, "rng": 0}


def init_state(
    trainable: Any, tx: optax.GradientTransformation, rng: jax.Array, axes: dict
) -> step_lib.State:
    """k single-adapter states (train/step.py ``init_state``), one per slot of the bank
    ``trainable``; every adapter starts from the dropout key ``rng``."""
    return jax.vmap(
        lambda params: step_lib.init_state(params, tx, rng),
        in_axes=(axes["params"],),
        out_axes=axes,
    )(trainable)


def train_step(
    forward: Callable[..., Any],
    make_tx: Callable[[jax.Array], optax.GradientTransformation],
    learning_rates: Sequence[float],
    label_smoothing: float,
    axes: dict,
    frozen_axes: Any,
) -> Callable[..., tuple[step_lib.State, dict]]:
    """``step(state, frozen, batches_KxBxL) -> (state, metrics)``: every adapter's update,
    each a single-adapter ``train_step`` with the optimizer ``make_tx(learning_rates[j])``
    (module docstring). Every metric gets a leading adapter axis (float32 [k])."""
    rates_N = jnp.asarray(learning_rates, jnp.float32)

    def adapter_step(state, frozen, batches, rate):
        one = step_lib.train_step(forward, make_tx(rate), label_smoothing, combine_slot)
        return one(state, frozen, batches)

    def step(state: step_lib.State, frozen: Any, batches: step_lib.Batch):
        return jax.vmap(adapter_step, in_axes=(axes, frozen_axes, None, 0), out_axes=(axes, 0))(
            state, frozen, batches, rates_N
        )

    return step


def eval_step(
    forward: Callable[..., Any], trainable_axes: Any, frozen_axes: Any
) -> Callable[..., Any]:
    """``step(trainable, frozen, batch_BxL, j) -> (summed loss, target tokens)`` of adapter
    ``j`` (int32 []) of the bank: train/step.py ``eval_step`` on that slot."""
    one = step_lib.eval_step(forward, combine_slot)

    def step(trainable: Any, frozen: Any, batch: step_lib.Batch, j: jax.Array):
        return one(slot(trainable, trainable_axes, j), slot(frozen, frozen_axes, j), batch)

    return step


def max_abs_each(trainable: Any, axes: Any) -> jax.Array:
    """float32 [k]: train/step.py ``max_abs`` of each adapter's slot of ``trainable``."""
    return jax.vmap(step_lib.max_abs, in_axes=(axes,))(trainable)
