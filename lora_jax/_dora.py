"""DoRA (Liu et al. 2024, arXiv 2402.09353; PEFT ``use_dora``): the weight's direction and
magnitude adapted apart.

    W' = m ⊙ (W + s·A·B) / ‖W + s·A·B‖_col

with the column norm taken over the input axes, one per output feature (PEFT's
``torch.linalg.norm(weight, dim=1)`` on its (fan_out, fan_in) weight), and m
(*stack, *out) the trained magnitude, initialised to ‖W‖_col so the adapted model
starts equal to the base.

The norm is computed **without forming W + s·A·B**. Column j of ΔW = A·B is A·b_j
(b_j = B[:, j], A (fan_in, r)), so

    ‖w_j + s·A·b_j‖² = ‖w_j‖² + 2s·⟨w_j, A·b_j⟩ + s²·‖A·b_j‖²
                     = ‖w_j‖² + 2s·(Wᵀ·A)_j · b_j + s²·b_jᵀ·(Aᵀ·A)·b_j,

three thin contractions: Σ_i W_ij² (fan_out), Wᵀ·A (fan_out × r) and Aᵀ·A (r × r);
none is fan_in × fan_out. As PEFT (after the paper's §4.3), the norm is a constant in
the backward pass (``stop_gradient``): its gradient is never formed.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp

from lora_jax._layout import Layout


def _letters(w_ndim: int, lay: Layout) -> tuple[str, str, str, str]:
    """(stacked, input, output, rank) einsum letters of a weight of `w_ndim` axes."""
    letters = string.ascii_lowercase
    stack = letters[: lay.stack]
    ins = letters[lay.stack : lay.stack + lay.fan_in]
    outs = letters[lay.stack + lay.fan_in : w_ndim]
    return stack, ins, outs, letters[w_ndim]


def weight_norm(w: jax.Array, lay: Layout) -> jax.Array:
    """‖W‖_col (*stack, *out) of W (*stack, *in, *out), accumulated in float32 or wider:
    DoRA's initial magnitude."""
    stack, ins, outs, _ = _letters(w.ndim, lay)
    k = stack + ins + outs
    acc = jnp.promote_types(w.dtype, jnp.float32)
    return jnp.sqrt(jnp.einsum(f"{k},{k}->{stack}{outs}", w, w, preferred_element_type=acc))


def adapted_norm(w: jax.Array, a: jax.Array, b: jax.Array, s: jax.Array, lay: Layout) -> jax.Array:
    """‖W + s·A·B‖_col (*stack, *out) by the thin-product expansion (module docstring).

    W (*stack, *in, *out), A (*stack, *in, r), B (*stack, r, *out), s (*stack,). The
    factors are cast to W's dtype and every contraction accumulates in float32 (or
    wider), as PEFT computes the norm in the input's dtype.
    """
    stack, ins, outs, r = _letters(w.ndim, lay)
    q = r.upper()
    k = stack + ins + outs
    acc = jnp.promote_types(w.dtype, jnp.float32)
    a, b = a.astype(w.dtype), b.astype(w.dtype)
    dot = lambda spec, *xs: jnp.einsum(spec, *xs, preferred_element_type=acc)
    w_sq = dot(f"{k},{k}->{stack}{outs}", w, w)
    wta = dot(f"{k},{stack}{ins}{r}->{stack}{outs}{r}", w, a)  # Wᵀ·A (*stack, *out, r)
    cross = dot(f"{stack}{outs}{r},{stack}{r}{outs}->{stack}{outs}", wta, b.astype(acc))
    ata = dot(f"{stack}{ins}{r},{stack}{ins}{q}->{stack}{r}{q}", a, a)  # Aᵀ·A (*stack, r, r)
    b_acc = b.astype(acc)
    quad = dot(f"{stack}{r}{outs},{stack}{r}{q},{stack}{q}{outs}->{stack}{outs}", b_acc, ata, b_acc)
    s_acc = s.astype(acc).reshape(s.shape + (1,) * len(outs))
    return jnp.sqrt(jnp.maximum(w_sq + 2 * s_acc * cross + s_acc**2 * quad, 0.0))


def magnitude_scale(
    m: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, s: jax.Array, lay: Layout
) -> jax.Array:
    """m / ‖W + s·A·B‖_col (*stack, *out), the norm held constant in the backward pass."""
    return m / jax.lax.stop_gradient(adapted_norm(w, a, b, s, lay))


def check_magnitude(name: str, w_shape, m_shape, lay: Layout) -> None:
    """A ValueError naming `name` unless m has the shape (*stack, *out) of W at `lay`."""
    expected = tuple(w_shape[: lay.stack]) + tuple(w_shape[lay.stack + lay.fan_in :])
    if tuple(m_shape) != expected:
        raise ValueError(
            f"{name}: the DoRA magnitude has shape {tuple(m_shape)}, but W {tuple(w_shape)} "
            f"needs (*stack, *out) = {expected}; the adapter was made for another base model."
        )
