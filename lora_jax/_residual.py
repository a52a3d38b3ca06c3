"""PiSSA and OLoRA: initialisations that move the base weight (PEFT ``init_lora_weights``).

Both put the principal part of W into the factors and leave the *residual*
W_res = W − s·A·B as the frozen base, so the adapted model starts equal to the original,
but the trained adapter is only valid on W_res:

* PiSSA (Meng et al. 2024): W = U·S·Vᵀ (fan_in × fan_out, in our layout), A = U_r·√(S_r/s),
  B = √(S_r/s)·V_rᵀ — PEFT's ``lora_A = diag(√(S_r/s))·Uh_r``, ``lora_B = V_r·diag(√(S_r/s))``
  of its transposed weight.
* OLoRA (Büyükakyüz 2024): Q·R = Wᵀ (fan_out × fan_in), A = (R[:r])ᵀ, B = (Q[:, :r])ᵀ —
  PEFT's ``lora_A = R[:r]``, ``lora_B = Q[:, :r]`` (not divided by s).

`convert_to_lora` is PEFT's ``path_initial_model_for_weight_conversion``: the trained
adapter plus the initial one give a rank-2r adapter for the *original* base, since
W_res + s·A·B = W + s·(A·B − A₀·B₀) = W + s·[A, A₀]·[B; −B₀].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import _layout, _merge, _tree

RESIDUAL_INITS = ("pissa", "olora")


def principal_factors(
    init: str, w: jax.Array, lay: _layout.Layout, rank: int, scale: float
) -> tuple[jax.Array, jax.Array]:
    """(A (*stack, *in, r), B (*stack, r, *out)) of PiSSA or OLoRA for W (*stack, *in, *out),
    computed in float32 (or wider)."""
    fan_in, fan_out = _layout.fans(w.shape, lay)
    acc = _layout.factor_dtype(w.dtype)
    w_SxIxO = w.astype(acc).reshape((-1, fan_in, fan_out))
    if init == "pissa":
        u_SxIxK, s_SxK, vt_SxKxO = jnp.linalg.svd(w_SxIxO, full_matrices=False)
        root_SxR = jnp.sqrt(s_SxK[:, :rank] / scale)
        a_SxIxR = u_SxIxK[:, :, :rank] * root_SxR[:, None, :]
        b_SxRxO = root_SxR[:, :, None] * vt_SxKxO[:, :rank, :]
    else:  # olora
        q_SxOxK, r_SxKxI = jnp.linalg.qr(jnp.swapaxes(w_SxIxO, 1, 2))
        a_SxIxR = jnp.swapaxes(r_SxKxI[:, :rank, :], 1, 2)
        b_SxRxO = jnp.swapaxes(q_SxOxK[:, :, :rank], 1, 2)
    a_shape, b_shape, _ = _layout.factor_shapes(w.shape, lay, rank)
    return a_SxIxR.reshape(a_shape), b_SxRxO.reshape(b_shape)


def convert_to_lora(trained: Any, initial: Any) -> Any:
    """A PiSSA/OLoRA adapter as a plain rank-2r adapter of the *original* base.

    Args:
      trained: the adapted tree after training: the residual base W_res and A, B, s.
      initial: the tree `lj.init` returned (W_res with A₀, B₀ at init), or its adapter
        (`lj.adapter`) beside any base.

    Returns:
      The original base W = W_res + s·A₀·B₀ with A' = [A, A₀] (*stack, *in, 2r),
      B' = [B; −B₀] (*stack, 2r, *out) and the same s: W + s·A'·B' = W_res + s·A·B. Export
      this one with `lj.to_peft` (as PEFT's ``convert_pissa_to_lora``; alpha doubles with r).
    """
    flat, start = _tree.flatten(trained), _tree.flatten(initial)
    out = dict(flat)
    for path in _tree.adapted_weights(flat):
        get = lambda tree, suffix: _tree.value(tree[_tree.lora_path(path, suffix)])
        missing = [
            _tree.path_str(_tree.lora_path(path, x))
            for x in (_tree.A_SUFFIX, _tree.B_SUFFIX)
            if _tree.lora_path(path, x) not in start
        ]
        if missing:
            raise ValueError(
                f"convert_to_lora: the initial adapter lacks {missing[0]}; give the tree "
                "lj.init returned (or lj.adapter of it) for the same targets."
            )
        if _tree.lora_path(path, _tree.MAGNITUDE_SUFFIX) in flat:
            raise ValueError(
                f"convert_to_lora: {_tree.path_str(path)} has a DoRA magnitude; the "
                "conversion holds for plain LoRA factors only."
            )
        w = _tree.value(flat[path])
        a, b, s = (get(flat, x) for x in (_tree.A_SUFFIX, _tree.B_SUFFIX, _tree.SCALE_SUFFIX))
        a0, b0 = get(start, _tree.A_SUFFIX), get(start, _tree.B_SUFFIX)
        lay = _layout.check_fits(_tree.path_str(path), w.shape, a.shape, b.shape, s.shape)
        acc = _layout.factor_dtype(w.dtype)
        dw = _merge.delta(_tree.path_str(path), w.shape, a0, b0, s, acc)
        original = (w.astype(acc) + dw).astype(w.dtype)
        out[path] = _tree.wrap_like(flat[path], original)
        out[_tree.lora_path(path, _tree.A_SUFFIX)] = _tree.wrap_like(
            flat[_tree.lora_path(path, _tree.A_SUFFIX)], jnp.concatenate([a, a0], axis=-1)
        )
        out[_tree.lora_path(path, _tree.B_SUFFIX)] = _tree.wrap_like(
            flat[_tree.lora_path(path, _tree.B_SUFFIX)],
            jnp.concatenate([b, -b0], axis=lay.stack),
        )
    return _tree.unflatten_like(trained, out)
