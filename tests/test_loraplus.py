"""LoRA+ (`lj.optimizer(..., loraplus_lr_ratio=λ)`): B's learning rate is λ× A's.

Checked against an independent route: a hand-made ``optax.multi_transform`` with one
optimizer per group at its own learning rate (what PEFT's ``create_loraplus_optimizer``
builds as torch param groups), and the closed form of one SGD step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj

from tolerances import assert_close, dot_error

LR, RATIO = 0.1, 16.0


def _params_and_grads():
    """(adapted params, gradients): drawn by numpy and `lj.init` jitted, as eagerly each
    jax.random draw compiles apart per shape (seconds on a small CPU)."""
    rng = np.random.default_rng(0)
    base = {"d": {"kernel": rng.standard_normal((8, 6), np.float32), "bias": jnp.zeros(6)}}
    config = lj.LoraConfig(2, 4, "kernel", bias="all")
    params = jax.jit(lj.init, static_argnums=2)(jax.random.key(1), base, config)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)), params)
    return params, grads


def _group_labels(params):
    def label(path, _):
        name = path[-1].key
        if name.endswith(("_lora_b", "_lora_delta")):
            return "b"
        return "a" if name.endswith("_lora_a") else "frozen"

    return jax.tree_util.tree_map_with_path(label, params)


def test_one_sgd_step_matches_the_closed_form():
    params, grads = _params_and_grads()
    tx = lj.optimizer(optax.sgd(LR), params, loraplus_lr_ratio=RATIO)
    updates, _ = tx.update(grads, tx.init(params), params)
    d, g = updates["d"], grads["d"]
    # Each update is one product lr·g (and λ·that for B): two roundings of |lr·λ·g|.
    for name, rate in [("kernel_lora_a", LR), ("kernel_lora_b", LR * RATIO)]:
        expected = -rate * np.asarray(g[name], np.float64)
        assert_close(d[name], expected, dot_error(np.abs(expected), 2), name)
    assert_close(
        d["bias_lora_delta"],
        -LR * RATIO * np.asarray(g["bias_lora_delta"]),
        dot_error(np.abs(LR * RATIO * np.asarray(g["bias_lora_delta"])), 2),
    )
    assert not np.any(d["kernel"]) and not np.any(d["kernel_lora_scale"])


def _three_steps(tx, params, grads):
    """`params` after 3 steps of `tx` on gradients (1 + step)·grads. Jitted: one compile,
    where eagerly each optax op compiles apart."""

    @jax.jit
    def run(params):
        state = tx.init(params)
        for step in range(3):
            g = jax.tree.map(lambda x: x * (1.0 + step), grads)
            updates, state = tx.update(g, state, params)
            params = optax.apply_updates(params, updates)
        return params

    return run(params)


@pytest.mark.parametrize("make", [optax.adam, lambda lr: optax.adamw(lr, weight_decay=0.1)])
def test_three_adam_steps_equal_per_group_optimizers(make):
    params, grads = _params_and_grads()
    ours = lj.optimizer(make(LR), params, loraplus_lr_ratio=RATIO)
    groups = optax.multi_transform(
        {"a": make(LR), "b": make(LR * RATIO), "frozen": optax.set_to_zero()},
        _group_labels(params),
    )
    p_ours, p_ref = _three_steps(ours, params, grads), _three_steps(groups, params, grads)

    # Adam's update is lr·(m̂/(√v̂+ε) + wd·p): ours rounds λ·(lr·x) where the reference
    # rounds (λ·lr)·x, one extra rounding of the update per step. The gradients are positive
    # multiples of one tree, so |m̂/√v̂| <= 1 (a weighted mean never exceeds the weighted RMS)
    # and each update is at most λ·lr·(1 + wd·|p|); 3 steps, each an update and an addition
    # into p: γ_8 of |p| + 3·λ·lr·(1 + 0.1·|p|).
    def bound(p):
        p = np.abs(np.asarray(p, np.float64))
        return dot_error(p + 3 * RATIO * LR * (1 + 0.1 * p), 8)

    jax.tree.map(lambda a, e: assert_close(a, e, bound(e)), p_ours, p_ref)
    moved = np.abs(np.asarray(p_ours["d"]["kernel_lora_b"] - params["d"]["kernel_lora_b"]))
    moved_a = np.abs(np.asarray(p_ours["d"]["kernel_lora_a"] - params["d"]["kernel_lora_a"]))
    assert moved.max() > 10 * moved_a.max()  # B really moved λ× faster (Adam: ~lr per step)


def test_a_ratio_that_is_not_positive_is_refused():
    params, _ = _params_and_grads()
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        lj.optimizer(optax.sgd(LR), params, loraplus_lr_ratio=0.0)
