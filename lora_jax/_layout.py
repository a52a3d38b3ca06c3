"""The layout of an adapted weight: which axes are stacked, input and output.

LoRA is a rank-r update of a *matrix*; a weight W is read as
``(*stack, *in_axes, *out_axes)``, with A (*stack, *in_axes, r),
B (*stack, r, *out_axes) and s (*stack,); fan_in and fan_out are the products
of the input and output axes, and flattened each stacked layer is the matrix
product of A (fan_in, r) and B (r, fan_out). A `Layout(stack, fan_in)` counts
the stacked and input axes; every other axis is an output, and there is at
least one.

Flattening rule (`default_layout`), for a weight without an explicit layout:

* a 2-D weight is (in, out) — ``nn.Dense`` kernels, and ``nn.Embed`` tables
  (vocab, features);
* a weight with more axes has one leading *stacked* axis (``nn.scan`` over
  layers) when every leaf of its enclosing block (the parent of its module)
  has at least two axes and the same leading size — a scan stacks all of them;
* of the remaining axes, the output axes are those of the module's bias (a
  ``nn.DenseGeneral`` (embed, heads, head_dim) kernel with bias (heads,
  head_dim) has one input axis; (heads, head_dim, embed) with bias (embed,)
  has two); without a bias, one input axis (DenseGeneral's default ``axis=-1``).

Anything else — nested scans, bias-free multi-axis outputs, ``nn.Einsum`` with
its own axis order — takes an explicit layout:
``lj.infer_layout(model.apply, variables, *args)`` reads every layout off the
model by tracing it once, or give ``{regex: Layout(stack, fan_in)}``.

Once factors exist the tree says the layout itself: `check_fits` reads it off
the shapes of W, A, B and s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _tree


class Layout(NamedTuple):
    """How a weight's axes split: `stack` leading stacked axes, then `fan_in`
    input axes; the remaining axes are outputs."""

    stack: int
    fan_in: int


def is_matrix(leaf: Any) -> bool:
    """Whether a leaf can be adapted: a floating-point array with two or more axes."""
    w = _tree.value(leaf)
    return getattr(w, "ndim", 0) >= 2 and jnp.issubdtype(w.dtype, jnp.floating)


def factor_dtype(dtype) -> np.dtype:
    """The dtype of the factors of a weight of `dtype`: float32 or wider."""
    return jnp.promote_types(dtype, jnp.float32)


def default_layout(path: _tree.Path, flat: Mapping[_tree.Path, Any]) -> Layout:
    """The layout of the weight at `path` of the flat tree by the flattening rule."""
    shape = _tree.value(flat[path]).shape
    if len(shape) == 2:
        return Layout(0, 1)
    block = path[:-2]
    siblings = [_tree.value(v).shape for p, v in flat.items() if p[: len(block)] == block]
    stack = int(all(len(s) >= 2 and s[0] == shape[0] for s in siblings))
    bias = flat.get(_tree.sibling(path, "bias"))
    if bias is not None:
        out_shape = _tree.value(bias).shape[stack:]
        n_out = len(out_shape)
        if 0 < n_out < len(shape) - stack and tuple(shape[len(shape) - n_out :]) == tuple(
            out_shape
        ):
            return Layout(stack, len(shape) - stack - n_out)
    return Layout(stack, 1)


def resolve(
    overrides: Mapping[str, Layout] | None, path: _tree.Path, flat: Mapping[_tree.Path, Any]
) -> Layout:
    """The layout of the weight at `path`: the first of `overrides` (``{path or regex:
    Layout}``) naming it, else `default_layout`; a ValueError if it does not fit the shape."""
    name = _tree.path_str(path)
    shape = _tree.value(flat[path]).shape
    lay = None
    for pattern, candidate in (overrides or {}).items():
        if pattern == name or re.fullmatch(pattern, name):
            lay = Layout(*candidate)
            break
    lay = lay or default_layout(path, flat)
    if not _valid(lay, len(shape)):
        raise ValueError(
            f"{name}: layout {lay} does not fit a weight of shape {shape}: it needs "
            "0 <= stack, 1 <= fan_in and at least one output axis."
        )
    return lay


def _valid(lay: Layout, ndim: int) -> bool:
    return lay.stack >= 0 and lay.fan_in >= 1 and lay.stack + lay.fan_in < ndim


def split(axes: Sequence, lay: Layout) -> tuple[Sequence, Sequence, Sequence]:
    """(stacked, input, output) parts of a weight's `axes`: its shape, its partition spec
    or its einsum subscripts (a string splits into strings)."""
    return (
        axes[: lay.stack],
        axes[lay.stack : lay.stack + lay.fan_in],
        axes[lay.stack + lay.fan_in :],
    )


def fans(shape: Sequence[int], lay: Layout) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight of `shape`: the products of its input and output axes."""
    _, ins, outs = split(tuple(shape), lay)
    return math.prod(ins), math.prod(outs)


def factor_shapes(w_shape: Sequence[int], lay: Layout, rank: int) -> tuple[tuple, tuple, tuple]:
    """The shapes of A (*stack, *in, r), B (*stack, r, *out) and s (*stack,) for a weight W
    (*stack, *in, *out) of `lay` at `rank`."""
    stack, ins, outs = split(tuple(w_shape), lay)
    return stack + ins + (rank,), stack + (rank,) + outs, stack


def check_fits(name: str, w_shape, a_shape, b_shape, s_shape) -> Layout:
    """The layout read off the factors' shapes (a ValueError naming `name` if they do not fit W).

    The axes count says it: A.ndim + B.ndim - 2 - W.ndim stacked axes and
    A.ndim - 1 - stack input axes; then A, B and s must have the `factor_shapes`
    of W at A's rank.
    """
    n_stack = len(a_shape) + len(b_shape) - 2 - len(w_shape)
    lay = Layout(n_stack, len(a_shape) - 1 - n_stack)
    if not (
        _valid(lay, len(w_shape))
        and factor_shapes(w_shape, lay, a_shape[-1])
        == (tuple(a_shape), tuple(b_shape), tuple(s_shape))
    ):
        raise ValueError(
            f"{name}: the adapter does not fit the base weight: A {tuple(a_shape)}, "
            f"B {tuple(b_shape)}, scale {tuple(s_shape)} against W {tuple(w_shape)} "
            "(expected A (*stack, *in, r), B (*stack, r, *out), scale (*stack,)). "
            "The adapter was made for another base model or another layout."
        )
    return lay


def flatten_factors(
    a: jax.Array, b: jax.Array, s: jax.Array, lay: Layout
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A (*stack, *in, r), B (*stack, r, *out), s (*stack,) as A (S, fan_in, r),
    B (S, r, fan_out) and s (S,), with S the product of the stacked axes (1 if none)."""
    size = math.prod(a.shape[: lay.stack])
    rank = a.shape[-1]
    fan_in, fan_out = math.prod(a.shape[lay.stack : -1]), math.prod(b.shape[lay.stack + 1 :])
    return (
        jnp.reshape(a, (size, fan_in, rank)),
        jnp.reshape(b, (size, rank, fan_out)),
        jnp.reshape(s, (size,)),
    )


def unflatten_factors(
    a_SxIxR: jax.Array, b_SxRxO: jax.Array, s_S: jax.Array, w_shape: Sequence[int], lay: Layout
) -> tuple[jax.Array, ...]:
    """Inverse of `flatten_factors` for a weight of `w_shape`: A (*stack, *in, r),
    B (*stack, r, *out) and s (*stack,) from A (S, fan_in, r), B (S, r, fan_out), s (S,)."""
    a_shape, b_shape, s_shape = factor_shapes(w_shape, lay, a_SxIxR.shape[-1])
    return jnp.reshape(a_SxIxR, a_shape), jnp.reshape(b_SxRxO, b_shape), jnp.reshape(s_S, s_shape)
