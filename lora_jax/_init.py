"""`init`: add LoRA factors beside the targeted weights of a parameter tree.

Which axes of a weight are stacked, input and output — and so the factors'
shapes — is the layout rule of `lora_jax._layout`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import _dora, _layout, _merge, _residual, _tree
from lora_jax._config import LoraConfig
from lora_jax._layout import Layout


def init(
    key: jax.Array, params: Any, config: LoraConfig, *, layout: Mapping[str, Layout] | None = None
) -> Any:
    """Returns `params` with LoRA factors beside every targeted weight.

    Base leaves are the very same objects as in `params` (nothing is copied), except
    with ``init="pissa"``/``"olora"``: those return each target as the residual
    W − s·A·B (the adapter is valid only on that base; see `lj.convert_to_lora`).
    Each target's factor draws from ``key`` folded with a hash of its path, so
    the result does not depend on the order of the tree's dicts, and adding or
    removing one target leaves the others' factors as they were.
    For each target W of shape (*stack, *in, *out) it adds A (*stack, *in, r),
    B (*stack, r, *out) — one of them zero, so the adapted model starts equal to
    the base — and the frozen scale s (*stack,) = alpha/r; with ``config.use_dora``
    also DoRA's magnitude m (*stack, *out) = ‖W‖_col. Factors are float32
    for bfloat16/float16 weights (the weight's dtype otherwise). With
    ``config.bias != "none"`` the selected biases gain a zero delta.

    Args:
      key: PRNG key for A (or B for embeddings).
      params: the base parameter tree (a Linen ``params`` dict, an
        ``nnx.State``, any nest of mappings).
      config: the `LoraConfig`.
      layout: optional ``{path or regex: Layout}``; paths not listed follow
        the flattening rule (`lora_jax._layout.default_layout`).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> adapted = lj.init(jax.random.key(0), params, lj.LoraConfig(2, 4, ".*kernel"))
      >>> adapted["dense"]["kernel_lora_a"].shape, adapted["dense"]["kernel_lora_b"].shape
      ((4, 2), (2, 3))
    """
    flat = _tree.flatten(params)
    if any(_tree.is_lora_leaf(p) for p in flat):
        raise ValueError(
            "params already hold LoRA factors; call lj.init on the base tree "
            "(lj.merge(params) folds an existing adapter in first)."
        )
    targets = [
        p
        for p, leaf in flat.items()
        if _layout.is_matrix(leaf) and config.is_target(_tree.path_str(p))
    ]
    if not targets:
        raise ValueError(_no_match_message(config, flat))

    new = dict(flat)
    for path in targets:
        leaf = flat[path]
        w = _tree.value(leaf)
        lay = _layout.resolve(layout, path, flat)
        path_key = jax.random.fold_in(key, zlib.crc32(_tree.path_str(path).encode()))
        factors = _factors(path_key, path, w, lay, config)
        for suffix, array in factors.items():
            new[_tree.lora_path(path, suffix)] = _tree.new_leaf_like(leaf, array)
        if config.init in _residual.RESIDUAL_INITS:  # W_res = W − s·A·B, in W's dtype
            acc = _layout.factor_dtype(w.dtype)
            dw = _merge.delta(_tree.path_str(path), w.shape, *(factors[x] for x in _SUFFIXES), acc)
            new[path] = _tree.wrap_like(leaf, (w.astype(acc) - dw).astype(w.dtype))
    for path in _trained_biases(flat, targets, config.bias):
        b = _tree.value(flat[path])
        new[_tree.sibling(path, "bias" + _tree.DELTA_SUFFIX)] = _tree.new_leaf_like(
            flat[path], jnp.zeros(b.shape, _layout.factor_dtype(b.dtype))
        )
    return _tree.unflatten_like(params, new)


_SUFFIXES = (_tree.A_SUFFIX, _tree.B_SUFFIX, _tree.SCALE_SUFFIX)


def _factors(key, path, w, lay: Layout, config: LoraConfig) -> dict[str, jax.Array]:
    """{suffix: factor} of W (*stack, *in, *out): A (*stack, *in, r), B (*stack, r, *out),
    s (*stack,)."""
    name = _tree.path_str(path)
    fan_in, fan_out = _layout.fans(w.shape, lay)
    rank = config.rank_for(name)
    if rank > min(fan_in, fan_out):
        raise ValueError(
            f"{name}: rank {rank} exceeds min(fan_in, fan_out) = min({fan_in}, {fan_out}) "
            f"of a weight of shape {w.shape} (layout {lay}); lower LoraConfig.rank or "
            "set a smaller one for this path with rank_pattern."
        )
    dtype = _layout.factor_dtype(w.dtype)
    a_shape, b_shape, s_shape = _layout.factor_shapes(w.shape, lay, rank)
    residual = config.init in _residual.RESIDUAL_INITS
    if residual and _tree.leaf_name(path) == "embedding":
        raise ValueError(
            f"{name}: init={config.init!r} adapts kernels, not embedding tables; leave the "
            "embedding out of LoraConfig.targets or use init='gaussian'."
        )
    if residual:
        a, b = _residual.principal_factors(config.init, w, lay, rank, config.scale_for(name))
    elif _tree.leaf_name(path) == "embedding":
        a = jnp.zeros(a_shape, dtype)
        b = jax.random.normal(key, b_shape, dtype)
    elif config.init == "gaussian":
        a = jax.random.normal(key, a_shape, dtype) / rank
        b = jnp.zeros(b_shape, dtype)
    else:  # kaiming_uniform with a=sqrt(5), as torch nn.Linear / loralib / PEFT
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
        b = jnp.zeros(b_shape, dtype)
    scale = jnp.full(s_shape, config.scale_for(name), jnp.float32)
    factors = {_tree.A_SUFFIX: a, _tree.B_SUFFIX: b, _tree.SCALE_SUFFIX: scale}
    if config.use_dora:
        if _tree.leaf_name(path) == "embedding":
            raise ValueError(
                f"{name}: DoRA adapts kernels, not embedding tables; leave the embedding "
                "out of LoraConfig.targets or set use_dora=False."
            )
        factors[_tree.MAGNITUDE_SUFFIX] = _dora.weight_norm(w, lay).astype(dtype)
    return factors


def _trained_biases(flat, targets, mode: str) -> list:
    if mode == "none":
        return []
    adapted_modules = {p[:-1] for p in targets}
    return [
        p
        for p, leaf in flat.items()
        if _tree.leaf_name(p) == "bias"
        and jnp.issubdtype(_tree.value(leaf).dtype, jnp.floating)
        and (mode == "all" or p[:-1] in adapted_modules)
    ]


def _no_match_message(config: LoraConfig, flat) -> str:
    eligible = [_tree.path_str(p) for p, leaf in flat.items() if _layout.is_matrix(leaf)]
    shown = ", ".join(eligible[:12]) + (" ..." if len(eligible) > 12 else "")
    return (
        f"LoraConfig.targets {config.targets!r} matches no weight (a leaf with two or "
        f"more axes) of the tree; the pattern is searched in slash-joined paths. "
        f"Weights available ({len(eligible)}): {shown or 'none'}. "
        r'Example: targets=r".*/(q_proj|v_proj)/kernel".'
    )
