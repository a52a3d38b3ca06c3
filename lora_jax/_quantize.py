"""A quantized frozen base: `quantize` and `dequantize` of targeted kernels.

Two storage formats of a weight W (*stack, *in, *out) with layout `Layout(stack, fan_in)`:

* ``"int8"``: q = round(W / c) in [−127, 127], int8, with one float32 scale per output
  channel c = max_in |W| / 127 (shape (*stack, 1…, *out)); |W − c·q| <= c/2.
* ``"nf4"`` (Dettmers et al. 2023, bitsandbytes' NF4): each layer's weights, flattened, in
  blocks of `block_size`, each block scaled by its absmax a (stored in bfloat16, rounded
  up so |W/a| <= 1) and each value the nearest of the 16 NF4 levels, its 4-bit index
  **packed two per byte** (uint8 (*stack, blocks, block_size/2)). |W − a·level| is at most
  half the largest gap between neighbouring levels times a. Bytes per parameter:
  1/2 + 2/block_size (0.53125 at 64).

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
class QuantizedArray:
    """A weight stored quantized. `data`: int8 (like W) or packed uint8
    (*stack, blocks, block_size/2); `scale`: float32 (*stack, 1…, *out) or bfloat16
    (*stack, blocks). Static: `fmt`, `inner_shape` (W's shape after the stacked axes),
    `dtype` (W's), `block_size`."""

    data: jax.Array
    scale: jax.Array
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
        """Bytes of the live buffers."""
        return int(self.data.nbytes + self.scale.nbytes)

    def dequantize(self) -> jax.Array:
        """W in its own dtype."""
        if self.fmt == "int8":
            return (self.data.astype(jnp.float32) * self.scale).astype(self.dtype)
        high, low = self.data >> 4, self.data & 0xF
        index = jnp.stack([high, low], axis=-1).reshape(self.data.shape[:-1] + (-1,))
        values = jnp.asarray(NF4_LEVELS)[index] * self.scale.astype(jnp.float32)[..., None]
        n_stack = self.data.ndim - 2
        size = math.prod(self.inner_shape)
        flat = values.reshape(self.data.shape[:n_stack] + (-1,))[..., :size]
        return flat.reshape(self.shape).astype(self.dtype)


def quantize_array(w: jax.Array, fmt: str, lay: _layout.Layout, block_size: int = 64):
    """W (*stack, *in, *out) as a `QuantizedArray` of `fmt` (module docstring)."""
    inner = tuple(w.shape[lay.stack :])
    w32 = w.astype(jnp.float32)
    if fmt == "int8":
        in_axes = tuple(range(lay.stack, lay.stack + lay.fan_in))
        absmax = jnp.max(jnp.abs(w32), axis=in_axes, keepdims=True)
        scale = jnp.where(absmax > 0, absmax / 127, 1.0)
        q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
        return QuantizedArray(q, scale, fmt, inner, w.dtype, block_size)
    if block_size % 2 or block_size <= 0:
        raise ValueError(f"lj.quantize: block_size {block_size} must be a positive even number.")
    stack = w.shape[: lay.stack]
    flat = w32.reshape(stack + (-1,))
    pad = -flat.shape[-1] % block_size
    blocks = jnp.pad(flat, [(0, 0)] * len(stack) + [(0, pad)]).reshape(stack + (-1, block_size))
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scale = absmax.astype(jnp.bfloat16)
    scale = jnp.where(  # rounded up, so every |w| / scale <= 1
        scale.astype(jnp.float32) < absmax, jnp.nextafter(scale, jnp.bfloat16(jnp.inf)), scale
    )
    safe = jnp.where(scale > 0, scale.astype(jnp.float32), 1.0)[..., None]
    index = jnp.argmin(jnp.abs((blocks / safe)[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1)
    pairs = index.astype(jnp.uint8).reshape(blocks.shape[:-1] + (block_size // 2, 2))
    packed = (pairs[..., 0] << 4) | pairs[..., 1]
    return QuantizedArray(packed, scale, fmt, inner, w.dtype, block_size)


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
    for path, leaf in flat.items():
        name = _tree.path_str(path)
        if _tree.is_lora_leaf(path) or not _layout.is_matrix(leaf) or not re.search(targets, name):
            continue
        lay = _layout.resolve(layout, path, flat)
        out[path] = quantize_array(_tree.value(leaf), fmt, lay, block_size)
    return _tree.unflatten_like(params, out)


def dequantize(params: Any) -> Any:
    """`params` with every `QuantizedArray` back as a plain array of its dtype (for export)."""
    flat = _tree.flatten(params)
    return _tree.unflatten_like(
        params,
        {p: v.dequantize() if isinstance(v, QuantizedArray) else v for p, v in flat.items()},
    )
