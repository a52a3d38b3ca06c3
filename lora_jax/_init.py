"""`init`: add LoRA factors beside the targeted weights of a parameter tree.

Flattening rule. LoRA is a rank-r update of a *matrix*; a weight is read as
``(*stack, *in_axes, *out_axes)``, with A (*stack, *in_axes, r) and
B (*stack, r, *out_axes); fan_in and fan_out are the products of the input and
output axes. Without an explicit layout:

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
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _tree
from lora_jax._config import LoraConfig


class Layout(NamedTuple):
  """How a weight's axes split: `stack` leading stacked axes, then `fan_in`
  input axes; the remaining axes are outputs."""

  stack: int
  fan_in: int


def default_layout(path: _tree.Path, flat: Mapping[_tree.Path, Any]) -> Layout:
  """The layout of the weight at `path` by the flattening rule (module docstring)."""
  shape = _tree.value(flat[path]).shape
  if len(shape) == 2:
    return Layout(0, 1)
  block = path[:-2]
  siblings = [_tree.value(v).shape for p, v in flat.items() if p[:len(block)] == block]
  stack = int(all(len(s) >= 2 and s[0] == shape[0] for s in siblings))
  bias = flat.get(_tree.sibling(path, "bias"))
  if bias is not None:
    out_shape = _tree.value(bias).shape[stack:]
    n_out = len(out_shape)
    if 0 < n_out < len(shape) - stack and tuple(shape[len(shape) - n_out:]) == tuple(out_shape):
      return Layout(stack, len(shape) - stack - n_out)
  return Layout(stack, 1)


def init(key: jax.Array, params: Any, config: LoraConfig, *,
         layout: Mapping[str, Layout] | None = None) -> Any:
  """Returns `params` with LoRA factors beside every targeted weight.

  Base leaves are the very same objects as in `params` (nothing is copied).
  Each target's factor draws from ``key`` folded with a hash of its path, so
  the result does not depend on the order of the tree's dicts, and adding or
  removing one target leaves the others' factors as they were.
  For each target W of shape (*stack, *in, *out) it adds A (*stack, *in, r),
  B (*stack, r, *out) — one of them zero, so the adapted model starts equal to
  the base — and the frozen scale s (*stack,) = alpha/r. Factors are float32
  for bfloat16/float16 weights (the weight's dtype otherwise). With
  ``config.bias != "none"`` the selected biases gain a zero delta.

  Args:
    key: PRNG key for A (or B for embeddings).
    params: the base parameter tree (a Linen ``params`` dict, an
      ``nnx.State``, any nest of mappings).
    config: the `LoraConfig`.
    layout: optional ``{path or regex: Layout}``; paths not listed follow
      the flattening rule (`default_layout`).

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> adapted = lj.init(jax.random.key(0), params, lj.LoraConfig(2, 4, ".*kernel"))
    >>> adapted["dense"]["kernel_lora_a"].shape, adapted["dense"]["kernel_lora_b"].shape
    ((4, 2), (2, 3))
  """
  flat = _tree.flatten(params)
  if any(_tree.is_lora_leaf(p) for p in flat):
    raise ValueError("params already hold LoRA factors; call lj.init on the base tree "
                     "(lj.merge(params) folds an existing adapter in first).")
  targets = [p for p, leaf in flat.items()
             if _is_matrix(leaf) and config.is_target(_tree.path_str(p))]
  if not targets:
    raise ValueError(_no_match_message(config, flat))

  new = dict(flat)
  for path in targets:
    leaf = flat[path]
    w = _tree.value(leaf)
    lay = _resolve_layout(layout, path, flat)
    path_key = jax.random.fold_in(key, zlib.crc32(_tree.path_str(path).encode()))
    factors = _factors(path_key, path, w, lay, config)
    for suffix, array in factors.items():
      new[_tree.sibling(path, _tree.leaf_name(path) + suffix)] = _tree.new_leaf_like(leaf, array)
  for path in _trained_biases(flat, targets, config.bias):
    b = _tree.value(flat[path])
    new[_tree.sibling(path, "bias" + _tree.DELTA_SUFFIX)] = _tree.new_leaf_like(
        flat[path], jnp.zeros(b.shape, _factor_dtype(b.dtype)))
  return _tree.unflatten_like(params, new)


def _is_matrix(leaf) -> bool:
  w = _tree.value(leaf)
  return getattr(w, "ndim", 0) >= 2 and jnp.issubdtype(w.dtype, jnp.floating)


def _factor_dtype(dtype) -> np.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _resolve_layout(layout, path, flat) -> Layout:
  name = _tree.path_str(path)
  shape = _tree.value(flat[path]).shape
  lay = None
  for pattern, candidate in (layout or {}).items():
    if pattern == name or re.fullmatch(pattern, name):
      lay = Layout(*candidate)
      break
  lay = lay or default_layout(path, flat)
  if lay.stack < 0 or lay.fan_in < 1 or lay.stack + lay.fan_in >= len(shape):
    raise ValueError(
        f"{name}: layout {lay} does not fit a weight of shape {shape}: it needs "
        "0 <= stack, 1 <= fan_in and at least one output axis.")
  return lay


def _factors(key, path, w, lay: Layout, config: LoraConfig) -> dict[str, jax.Array]:
  name = _tree.path_str(path)
  stack = w.shape[: lay.stack]
  ins = w.shape[lay.stack: lay.stack + lay.fan_in]
  outs = w.shape[lay.stack + lay.fan_in:]
  fan_in, fan_out = math.prod(ins), math.prod(outs)
  rank = config.rank_for(name)
  if rank > min(fan_in, fan_out):
    raise ValueError(
        f"{name}: rank {rank} exceeds min(fan_in, fan_out) = min({fan_in}, {fan_out}) "
        f"of a weight of shape {w.shape} (layout {lay}); lower LoraConfig.rank or "
        "set a smaller one for this path with rank_pattern.")
  dtype = _factor_dtype(w.dtype)
  a_shape, b_shape = stack + ins + (rank,), stack + (rank,) + outs
  if _tree.leaf_name(path) == "embedding":
    a = jnp.zeros(a_shape, dtype)
    b = jax.random.normal(key, b_shape, dtype)
  elif config.init == "gaussian":
    a = jax.random.normal(key, a_shape, dtype) / rank
    b = jnp.zeros(b_shape, dtype)
  else:  # kaiming_uniform with a=sqrt(5), as torch nn.Linear / loralib / PEFT
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    b = jnp.zeros(b_shape, dtype)
  scale = jnp.full(stack, config.scale_for(name), jnp.float32)
  return {_tree.A_SUFFIX: a, _tree.B_SUFFIX: b, _tree.SCALE_SUFFIX: scale}


def _trained_biases(flat, targets, mode: str) -> list:
  if mode == "none":
    return []
  adapted_modules = {p[:-1] for p in targets}
  return [p for p, leaf in flat.items()
          if _tree.leaf_name(p) == "bias"
          and jnp.issubdtype(_tree.value(leaf).dtype, jnp.floating)
          and (mode == "all" or p[:-1] in adapted_modules)]


def _no_match_message(config: LoraConfig, flat) -> str:
  eligible = [_tree.path_str(p) for p, leaf in flat.items() if _is_matrix(leaf)]
  shown = ", ".join(eligible[:12]) + (" ..." if len(eligible) > 12 else "")
  return (f"LoraConfig.targets {config.targets!r} matches no weight (a leaf with two or "
          f"more axes) of the tree; the pattern is searched in slash-joined paths. "
          f"Weights available ({len(eligible)}): {shown or 'none'}. "
          r'Example: targets=r".*/(q_proj|v_proj)/kernel".')
