"""Adapter arithmetic on factors: `weighted_sum` (exact, ranks add) and `compress` (SVD).

Both take and return adapter trees (A, B, s beside each target, as `lj.adapter` gives) and
never form a weight-sized ΔW: a sum concatenates factors, and the SVD of s·A·B comes from
QR factorisations of A and (s·B)ᵀ and the SVD of an r×r core.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import _bank, _layout, _tree
from lora_jax._layout import Layout


def weighted_sum(adapters: Sequence[Any], weights: Sequence[float]) -> Any:
    """The adapter whose ΔW is Σ_i weights[i]·ΔW_i, exactly: its rank is the sum of theirs.

    At each weight that any adapter targets, A = [A_1 … A_k] (concatenated along the rank
    axis) and B = [w_1·s_1·B_1; …; w_k·s_k·B_k], scale 1, so s·A·B = Σ w_i·s_i·A_i·B_i (up to
    one rounding of each w_i·s_i·B_i); adapters lacking a target add no columns there. The
    result is in the first adapter's container type; `compress` brings its rank back down.

    Raises:
      ValueError: one line, when `weights` and `adapters` differ in length, an adapter has
        bias deltas or no scales, or two adapters' factors disagree in shape at a target.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> base = {"d": {"kernel": jnp.ones((4, 3))}}
      >>> a = lj.adapter(lj.init(jax.random.key(0), base, lj.LoraConfig(2, 4, ".*kernel")))
      >>> lj.weighted_sum([a, a], [0.5, 0.5])["d"]["kernel_lora_a"].shape
      (4, 4)
    """
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(
            f"lj.weighted_sum: {len(adapters)} adapters and {len(weights)} weights; give one "
            "weight per adapter (at least one)."
        )
    flats = [_bank.adapter_flat(a, i) for i, a in enumerate(adapters)]
    targets = list(dict.fromkeys(w for flat in flats for w in _tree.adapted_weights(flat)))
    template = next(iter(_tree.flatten(adapters[0]).values()))
    out = {}
    for weight in targets:
        terms = [
            (i, _bank.factors(flat, weight))
            for i, flat in enumerate(flats)
            if weight in _tree.adapted_weights(flat)
        ]
        a0, b0, s0 = terms[0][1]
        n_stack = s0.ndim
        for i, (a, b, s) in terms[1:]:
            if _bank.shapes_without_rank(a, b, s) != _bank.shapes_without_rank(a0, b0, s0):
                raise ValueError(
                    f"lj.weighted_sum: adapter {i}'s factors at {_tree.path_str(weight)} (A "
                    f"{a.shape}, B {b.shape}) do not fit adapter {terms[0][0]}'s (A {a0.shape}, "
                    f"B {b0.shape}); add adapters of one base."
                )
        dtype = jnp.result_type(*(f for _, (a, b, _) in terms for f in (a, b)))
        a_cat = jnp.concatenate([a.astype(dtype) for _, (a, _, _) in terms], axis=-1)
        b_cat = jnp.concatenate(
            [
                (weights[i] * _broadcast_scale(s, b.ndim) * b.astype(jnp.float32)).astype(dtype)
                for i, (_, b, s) in terms
            ],
            axis=n_stack,
        )
        leaves = (a_cat, b_cat, jnp.ones(s0.shape, jnp.float32))
        for suffix, leaf in zip(_bank.ADAPTER_SUFFIXES, leaves, strict=True):
            out[_tree.lora_path(weight, suffix)] = _tree.new_leaf_like(template, leaf)
    return _tree.unflatten_like(adapters[0], out)


def _broadcast_scale(s: jax.Array, ndim: int) -> jax.Array:
    """s (*stack,) shaped to multiply a factor of `ndim` axes whose leading axes are stack."""
    return s.astype(jnp.float32).reshape(s.shape + (1,) * (ndim - s.ndim))


def compress(adapter: Any, rank: int) -> tuple[Any, dict[str, jax.Array]]:
    """The best adapter of rank ≤ `rank` at each target, and how far it is from `adapter`.

    Each stacked layer's ΔW = s·A·B is replaced by its truncated SVD, U_k·Σ_k·V_kᵀ with
    k = min(rank, rank of the factors): A' = U_k·√Σ_k, B' = √Σ_k·V_kᵀ, scale 1. By
    Eckart–Young no matrix of rank ≤ k is closer in the Frobenius (or spectral) norm.
    Computed from QR factorisations A = Q_a·R_a, (s·B)ᵀ = Q_b·R_b and the SVD of the small
    core R_a·R_bᵀ, in float32 or the factors' wider dtype; ΔW is never formed.

    Args:
      adapter: an adapter tree (A, B, s per target), e.g. from `weighted_sum`.
      rank: the target rank, ≥ 1.

    Returns:
      (compressed adapter, errors): ``errors[path]`` is ‖ΔW − ΔW'‖_F per stacked layer
      (shape (*stack,)), which is sqrt(Σ of the dropped σ²), ``path`` the weight's path.
    """
    if int(rank) != rank or rank < 1:
        raise ValueError(f"lj.compress: rank {rank!r} must be an integer >= 1.")
    flat = _bank.adapter_flat(adapter, 0)
    template = next(iter(flat.values()))
    out, errors = {}, {}
    for weight in _tree.adapted_weights(flat):
        a, b, s = _bank.factors(flat, weight)
        n_stack = s.ndim
        lay = Layout(n_stack, a.ndim - 1 - n_stack)
        w_shape = a.shape[:-1] + b.shape[n_stack + 1 :]
        dtype = _layout.factor_dtype(jnp.result_type(a, b))
        a_SxIxR, b_SxRxO, s_S = _layout.flatten_factors(a.astype(dtype), b.astype(dtype), s, lay)
        q_a, r_a = jnp.linalg.qr(a_SxIxR)
        q_b, r_b = jnp.linalg.qr(jnp.swapaxes(b_SxRxO * s_S[:, None, None].astype(dtype), 1, 2))
        u_SxMxM, sigma_SxM, vt_SxMxM = jnp.linalg.svd(
            r_a @ jnp.swapaxes(r_b, 1, 2), full_matrices=False
        )
        k = min(int(rank), sigma_SxM.shape[-1])
        root_SxK = jnp.sqrt(sigma_SxM[:, :k])
        new_a = (q_a @ u_SxMxM[:, :, :k]) * root_SxK[:, None, :]
        new_b = root_SxK[:, :, None] * (vt_SxMxM[:, :k, :] @ jnp.swapaxes(q_b, 1, 2))
        ones_S = jnp.ones(s_S.shape, jnp.float32)
        leaves = _layout.unflatten_factors(new_a, new_b, ones_S, w_shape, lay)
        dtypes = (a.dtype, b.dtype, jnp.float32)
        for suffix, leaf, dt in zip(_bank.ADAPTER_SUFFIXES, leaves, dtypes, strict=True):
            out[_tree.lora_path(weight, suffix)] = _tree.new_leaf_like(template, leaf.astype(dt))
        dropped_S = jnp.sqrt(jnp.sum(sigma_SxM[:, k:] ** 2, axis=-1))
        errors[_tree.path_str(weight)] = dropped_S.reshape(s.shape)
    return _tree.unflatten_like(adapter, out), errors
