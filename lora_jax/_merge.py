"""Folding an adapter into its weights and back: `materialize`, `merge`, `unmerge`; one
adapter of a bank (`lj.stack`) with ``merge(params, adapter_id=i)``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import _bank, _dora, _layout, _quantize, _tree


def delta(
    name: str, w_shape, a: jax.Array, b: jax.Array, s: jax.Array, dtype=jnp.float32
) -> jax.Array:
    """ΔW = s·A·B in `dtype`, shaped like the weight W (*stack, *in, *out) (this does
    materialise it) from A (*stack, *in, r), B (*stack, r, *out) and s (*stack,)."""
    lay = _layout.check_fits(name, w_shape, a.shape, b.shape, s.shape)
    a_SxIxR, b_SxRxO, s_S = _layout.flatten_factors(
        a.astype(dtype), b.astype(dtype), s.astype(dtype), lay
    )
    dw_SxIxO = jnp.einsum("sir,sro->sio", a_SxIxR * s_S[:, None, None], b_SxRxO)
    return dw_SxIxO.reshape(w_shape)


def _dora_direction(name: str, adapted: jax.Array, m: jax.Array, get) -> jax.Array:
    """m ⊙ V / ‖V‖_col for V = W + s·A·B (*stack, *in, *out): DoRA's merged weight."""
    lay = _layout.check_fits(
        name,
        adapted.shape,
        *(get(x).shape for x in (_tree.A_SUFFIX, _tree.B_SUFFIX, _tree.SCALE_SUFFIX)),
    )
    _dora.check_magnitude(name, adapted.shape, m.shape, lay)
    in_axes = tuple(range(lay.stack, lay.stack + lay.fan_in))
    norm = jnp.sqrt(jnp.sum(adapted * adapted, axis=in_axes, keepdims=True))
    return adapted * (jnp.expand_dims(m.astype(adapted.dtype), in_axes) / norm)


def _fold(
    params: Any, sign: int, adapter_flat: dict | None = None, requantize: bool = False
) -> dict:
    """W ± s·A·B and b ± δ for every adapter, as a flat tree without the LoRA leaves. A
    quantized W (`lj.quantize`) is dequantised first; with `requantize` the sum is stored
    back in W's format, else as a plain array of W's dtype."""
    flat = _tree.flatten(params)
    lora = (
        adapter_flat
        if adapter_flat is not None
        else {p: leaf for p, leaf in flat.items() if _tree.is_lora_leaf(p)}
    )
    if not any(_tree.is_trainable_leaf(p) for p in lora):
        raise ValueError(
            "the tree holds no LoRA adapter (no *_lora_a/_lora_b/_lora_delta "
            "leaves); lj.init adds one, and an already merged tree needs no merge."
        )
    out = {p: leaf for p, leaf in flat.items() if not _tree.is_lora_leaf(p)}
    for path in _tree.adapted_weights(lora):
        name = _tree.path_str(path)
        if path not in out:
            raise ValueError(
                f"{name}: the adapter has factors for a weight the tree lacks; "
                "it was made for another base model."
            )
        w = quantized = _tree.value(out[path])
        if isinstance(quantized, _quantize.QuantizedArray):
            if sign < 0:
                raise ValueError(
                    f"{name}: a quantized weight cannot be unmerged exactly (the merge "
                    "requantised W + s·A·B to the format's grid); keep the quantized base "
                    "and the adapter apart instead."
                )
            w = quantized.dequantize(jnp.promote_types(quantized.dtype, jnp.float32))

        def get(suffix):
            part = _tree.lora_path(path, suffix)
            if part not in lora:
                raise ValueError(
                    f"{_tree.path_str(part)} is missing: the adapter is incomplete. Pass "
                    "lj.adapter(params) or the adapted params (the scales are frozen leaves, "
                    "not part of the trainable half)."
                )
            return _tree.value(lora[part])

        accumulate = jnp.promote_types(w.dtype, jnp.float32)
        dw = delta(
            name,
            w.shape,
            get(_tree.A_SUFFIX),
            get(_tree.B_SUFFIX),
            get(_tree.SCALE_SUFFIX),
            accumulate,
        )
        adapted = w.astype(accumulate) + sign * dw
        magnitude = _tree.lora_path(path, _tree.MAGNITUDE_SUFFIX)
        if magnitude in lora:
            if sign < 0:
                raise ValueError(
                    f"{name}: a DoRA adapter cannot be unmerged (W' = m·(W + sAB)/‖W + sAB‖ "
                    "does not give W back without the norm); keep the base weights instead."
                )
            adapted = _dora_direction(name, adapted, _tree.value(lora[magnitude]), get)
        if not isinstance(quantized, _quantize.QuantizedArray):
            adapted = adapted.astype(w.dtype)
        elif requantize:
            lay = _layout.check_fits(name, w.shape, *(get(x).shape for x in _SINGLE))
            adapted = _quantize.quantize_array(
                adapted, quantized.fmt, lay, quantized.block_size, quantized.dtype
            )
        else:
            adapted = adapted.astype(quantized.dtype)
        out[path] = _tree.wrap_like(out[path], adapted)
    for path, leaf in lora.items():
        if _tree.leaf_name(path).endswith(_tree.DELTA_SUFFIX):
            bias_path = _tree.base_of(path)
            b = _tree.value(out[bias_path])
            d = _tree.value(leaf)
            if b.shape != d.shape:
                raise ValueError(
                    f"{_tree.path_str(path)}: shape {d.shape} does not fit the bias "
                    f"{b.shape}; the adapter was made for another base model."
                )
            out[bias_path] = _tree.wrap_like(
                out[bias_path], (b + sign * d.astype(b.dtype)).astype(b.dtype)
            )
    return out


_SINGLE = (_tree.A_SUFFIX, _tree.B_SUFFIX, _tree.SCALE_SUFFIX)


def materialize(params: Any) -> Any:
    """W + s·A·B for every adapted weight, as a tree shaped like the base tree.

    The generic path: run *any* JAX function of the base parameters on the
    result. Inside a jitted, differentiated step the gradient flows to A and B
    (but the full-size W + ΔW and its gradient are materialised; `lj.apply`
    avoids both). Accumulates in float32 (or wider) and casts back to W's dtype. A
    quantized W (`lj.quantize`) gives a plain array: dequant(W) + s·A·B in W's dtype.
    """
    _refuse_bank(params)
    return _tree.unflatten_like(params, _fold(params, +1))


def _refuse_bank(params: Any) -> None:
    if _bank.has_bank(params):
        raise ValueError(
            f"the tree holds a bank of {_bank.size(params)} adapters: pick one with "
            "lj.merge(params, adapter_id=i)."
        )


def merge(params: Any, *, adapter_id: int | jax.Array | None = None) -> Any:
    """Folds every adapter into its weight and drops the LoRA leaves (for export).

    A DoRA adapter merges to m ⊙ (W + s·A·B) / ‖W + s·A·B‖_col.

    The result has exactly the base tree's structure, shapes and dtypes, so the
    unmodified model runs it at no extra cost. s·A·B is accumulated in float32 and
    cast back to W's dtype. Trained bias deltas are added to their biases.

    A quantized W (`lj.quantize`; PEFT users meet it as peft #2321) merges by dequantise →
    add s·A·B (float32) → requantise in W's format (same block size, nf4's double-quantised
    scales): the result is a quantized tree of the same structure, and rounding the sum to
    the format's grid adds the format's error again (nf4: up to half the largest level gap
    times the block scale per element; int8: half a step). `merge_error` measures it.
    Such a merge cannot be unmerged (`unmerge` refuses it).

    With `adapter_id`, `params` hold the base and a bank (`lj.stack`) and the result is the
    base with slot `adapter_id` folded in, the bank dropped. The slot's rank-padded factors
    are used as they are (zeros add nothing), so `adapter_id` may be traced under ``jit``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> base = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> adapted = lj.init(jax.random.key(0), base, lj.LoraConfig(2, 4, ".*kernel"))
      >>> jax.tree.structure(lj.merge(adapted)) == jax.tree.structure(base)
      True
    """
    if adapter_id is None:
        _refuse_bank(params)
        return _tree.unflatten_like(params, _fold(params, +1, requantize=True))
    flat = _tree.flatten(params)
    single = [p for p in flat if _tree.is_lora_leaf(p)]
    if single:
        raise ValueError(
            f"the tree holds a bank and another adapter ({_tree.path_str(single[0])}); merge "
            "that one with lj.merge first, or drop it, then pick a slot of the bank."
        )
    slot = _bank.slot(params, adapter_id)
    base = {p: leaf for p, leaf in flat.items() if not _bank.is_bank_leaf(p)}
    return _tree.unflatten_like(
        params, _fold(_tree.unflatten_like(params, base), +1, slot, requantize=True)
    )


def merge_error(params: Any) -> dict[str, jax.Array]:
    """{path of each quantized adapted weight: max |dequant(merge(W)) − (dequant(W) + ΔW)|}
    (float32 scalars): what requantising the merge (`merge`) costs, ΔW the adapter's exact
    update (s·A·B, or DoRA's) in float32. Empty when no adapted weight is quantized."""
    flat = _tree.flatten(params)
    quantized = [
        p
        for p in _tree.adapted_weights(flat)
        if isinstance(_tree.value(flat[p]), _quantize.QuantizedArray)
    ]
    if not quantized:
        return {}
    exact = _tree.flatten(materialize(_quantize.dequantize(params, jnp.float32)))
    merged = _tree.flatten(_quantize.dequantize(merge(params), jnp.float32))
    return {
        _tree.path_str(p): jnp.max(jnp.abs(_tree.value(merged[p]) - _tree.value(exact[p])))
        for p in quantized
    }


def unmerge(merged: Any, adapter: Any) -> Any:
    """Inverse of `merge`: W = W_merged − s·A·B, with the adapter's leaves put back.

    Args:
      merged: a tree returned by `merge` (no LoRA leaves).
      adapter: a tree holding the adapter's leaves (`lj.adapter(params)`, or the
        adapted params themselves).

    Returns:
      The adapted tree (equal to the one that was merged, up to float rounding).
    """
    flat_merged = _tree.flatten(merged)
    if any(_tree.is_lora_leaf(p) for p in flat_merged):
        raise ValueError(
            "unmerge expects a merged tree (no LoRA leaves); this one still has "
            "an adapter, so there is nothing to unmerge."
        )
    lora = {p: leaf for p, leaf in _tree.flatten(adapter).items() if _tree.is_lora_leaf(p)}
    out = _fold(merged, -1, lora)
    template = next(iter(flat_merged.values()))
    out.update({p: _tree.new_leaf_like(template, _tree.value(leaf)) for p, leaf in lora.items()})
    return _tree.unflatten_like(merged, out)
