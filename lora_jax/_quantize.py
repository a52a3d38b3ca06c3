"""A quantized frozen base: `quantize` and `dequantize` of targeted kernels.

Two storage formats of a weight W (*stack, *in, *out) with layout `Layout(stack, fan_in)`:

* ``"int8"``: q = round(W / c) in [−127, 127], int8, with one float32 scale per output
  channel c = max_in |W| / 127 (shape (*stack, 1…, *out)); |W − c·q| <= c/2.
* ``"nf4"`` (Dettmers et al. 2023, QLoRA §3, bitsandbytes' NF4 with double quantisation):
  each layer's weights, flattened, in blocks of `block_size`; each value the nearest of
  the 16 NF4 levels times its block's scale â, its 4-bit index **packed two per byte**
  (uint8 (*stack, blocks, block_size/2)). The block absmax scales a are themselves
  quantized (`BlockScales`): centred on their layer's mean μ, in groups of
  ``SCALE_GROUP`` = 256 blocks, â = μ + g·round((a − μ)/g) with an int8 code per block
  and one float32 step g = max_group |a − μ| / 127 per group, so |a − â| <= g/2.
  The values are quantized against â itself, so per element
  |W − â·level| <= max(NF4_HALF_GAP·|â|, |a − â|): half the largest gap between
  neighbouring levels times the block's scale, or (a value beyond a scale rounded down)
  the scale's own error, which adds a relative g/2 <= max a / 254 to the format's bound.
  Bytes per parameter: 1/2 + 1/block_size + 4/(256·block_size) + 4/(layer size)
  (0.51589 for a 576 × 576 layer at block 64).

`QuantizedArray` is a pytree (its arrays are leaves, the format static), so it sits in a
parameter tree where the kernel was, is sliced by ``nn.scan`` like any stacked weight
(the stacked axes lead every buffer), and jits.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _layout, _tree

FORMATS = ("int8", "nf4")
SCALE_GROUP = 256  # nf4 block scales per float32 step (QLoRA's second quantisation)
# The 16 NF4 levels of bitsandbytes (quantiles of N(0, 1) scaled to [−1, 1]).
NF4_LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip
NF4_HALF_GAP = float(np.max(np.diff(NF4_LEVELS))) / 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockScales:
    """nf4's block scales, double-quantised: â = mean + step·code (module docstring).
    `code`: int8 (*stack, blocks); `step`: float32 (*stack, ceil(blocks / SCALE_GROUP));
    `mean`: float32 (*stack, 1)."""

    code: jax.Array
    step: jax.Array
    mean: jax.Array

    def values(self) -> jax.Array:
        """â, float32 (*stack, blocks)."""
        step = jnp.repeat(self.step, SCALE_GROUP, axis=-1)[..., : self.code.shape[-1]]
        return self.mean + step * self.code.astype(jnp.float32)


def quantize_scales(absmax: jax.Array) -> BlockScales:
    """Block scales a (*stack, blocks) as `BlockScales`: centred on their mean, in groups of
    SCALE_GROUP, each an int8 code of one float32 step; |a − â| <= step/2 (plus rounding)."""
    stack, blocks = absmax.shape[:-1], absmax.shape[-1]
    mean = jnp.mean(absmax, axis=-1, keepdims=True)
    pad = [(0, 0)] * len(stack) + [(0, -blocks % SCALE_GROUP)]
    groups = jnp.pad(absmax - mean, pad).reshape(stack + (-1, SCALE_GROUP))
    largest = jnp.max(jnp.abs(groups), axis=-1)
    step = jnp.where(largest > 0, largest / 127, 1.0)
    code = jnp.clip(jnp.round(groups / step[..., None]), -127, 127).astype(jnp.int8)
    return BlockScales(code.reshape(stack + (-1,))[..., :blocks], step, mean)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A weight stored quantized. `data`: int8 (like W) or packed uint8
    (*stack, blocks, block_size/2); `scale`: float32 (*stack, 1…, *out) or the nf4 block
    scales (`BlockScales`). Static: `fmt`, `inner_shape` (W's shape after the stacked axes),
    `dtype` (W's), `block_size`."""

    data: jax.Array
    scale: jax.Array | BlockScales
    fmt: str = dataclasses.field(metadata=dict(static=True))
    inner_shape: tuple = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple:
        n_stack = self.data.ndim - (2 if self.fmt == "nf4" else len(self.inner_shape))
        return tuple(self.data.shape[:n_stack]) + tuple(self.inner_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the live buffers (every array leaf)."""
        return sum(int(x.nbytes) for x in jax.tree.leaves(self))

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """W in `dtype` (None: W's own)."""
        dtype = self.dtype if dtype is None else dtype
        if self.fmt == "int8":
            return (self.data.astype(jnp.float32) * self.scale).astype(dtype)
        high, low = self.data >> 4, self.data & 0xF
        index = jnp.stack([high, low], axis=-1).reshape(self.data.shape[:-1] + (-1,))
        values = jnp.asarray(NF4_LEVELS)[index] * self.scale.values()[..., None]
        n_stack = self.data.ndim - 2
        size = math.prod(self.inner_shape)
        flat = values.reshape(self.data.shape[:n_stack] + (-1,))[..., :size]
        return flat.reshape(self.shape).astype(dtype)


def quantize_array(
    w: jax.Array, fmt: str, lay: _layout.Layout, block_size: int = 64, dtype: Any = None
) -> QuantizedArray:
    """W (*stack, *in, *out) as a `QuantizedArray` of `fmt` (module docstring) that
    dequantises to `dtype` (None: W's)."""
    dtype = w.dtype if dtype is None else dtype
    inner = tuple(w.shape[lay.stack :])
    w32 = w.astype(jnp.float32)
    if fmt == "int8":
        in_axes = tuple(range(lay.stack, lay.stack + lay.fan_in))
        absmax = jnp.max(jnp.abs(w32), axis=in_axes, keepdims=True)
        scale = jnp.where(absmax > 0, absmax / 127, 1.0)
        q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
        return QuantizedArray(q, scale, fmt, inner, dtype, block_size)
    if block_size % 2 or block_size <= 0:
        raise ValueError(f"lj.quantize: block_size {block_size} must be a positive even number.")
    stack = w.shape[: lay.stack]
    flat = w32.reshape(stack + (-1,))
    pad = -flat.shape[-1] % block_size
    blocks = jnp.pad(flat, [(0, 0)] * len(stack) + [(0, pad)]).reshape(stack + (-1, block_size))
    scale = quantize_scales(jnp.max(jnp.abs(blocks), axis=-1))
    value = scale.values()
    safe = jnp.where(value != 0, value, 1.0)[..., None]
    index = jnp.argmin(jnp.abs((blocks / safe)[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1)
    pairs = index.astype(jnp.uint8).reshape(blocks.shape[:-1] + (block_size // 2, 2))
    packed = (pairs[..., 0] << 4) | pairs[..., 1]
    return QuantizedArray(packed, scale, fmt, inner, dtype, block_size)


def quantize(
    params: Any, fmt: str, targets: str = ".*", *, block_size: int = 64, layout=None
) -> Any:
    """`params` with every weight (two or more axes, floating) whose path `targets` (a regex,
    ``re.search``) matches stored as a `QuantizedArray` of `fmt` ("int8" or "nf4"); run it
    with `lj.apply`, which dequantises each kernel inside its layer."""
    if fmt not in FORMATS:
        raise ValueError(f"lj.quantize: unknown format {fmt!r}; use one of {FORMATS}.")
    flat = _tree.flatten(params)
    out = dict(flat)
    # Layouts by the base's leaves alone: an adapter's one-axis scales beside a stacked
    # kernel would hide its stacked axis from the flattening rule.
    base = {p: leaf for p, leaf in flat.items() if not _tree.is_adapter_leaf(p)}
    for path, leaf in base.items():
        name = _tree.path_str(path)
        if not _layout.is_matrix(leaf) or not re.search(targets, name):
            continue
        lay = _layout.resolve(layout, path, base)
        out[path] = quantize_array(_tree.value(leaf), fmt, lay, block_size)
    return _tree.unflatten_like(params, out)


def dequantize(params: Any, dtype: Any = None) -> Any:
    """`params` with every `QuantizedArray` back as a plain array of `dtype` (None: its
    weight's own), e.g. for export."""
    flat = _tree.flatten(params)
    return _tree.unflatten_like(
        params,
        {p: v.dequantize(dtype) if isinstance(v, QuantizedArray) else v for p, v in flat.items()},
    )
