"""`lj.apply` for the adapted weights no stock Linen layer consumed: the traced call.

`call` traces ``fn(tree, *args, **kwargs)`` once with ``jax.make_jaxpr`` and evaluates it
again (`lora_jax._rewrite.evaluate`) with every adapted weight that the Linen interceptor
did not consume carried with its factors, so that each of its matmuls and lookups adds
s·(x·A)·B. An ``nnx.State`` reaches ``fn`` without its LoRA leaves (``nnx.merge`` accepts
only the leaves its graph has); a Linen tree keeps them (the interceptor reads those of
stock layers; a Linen module never reads the others). A bias delta that no layer consumed
is added to its bias before the call (exact: the bias enters the computation additively).

The rewrite supports plain LoRA factors and bias deltas. It raises for an adapter bank
(``adapter_ids``), a DoRA magnitude, a quantized kernel, and LoRA dropout > 0, which
reach stock Linen layers only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from lora_jax import _rewrite, _tree
from lora_jax._quantize import QuantizedArray


def pending(tree: Any, consumed: set[_tree.Path]) -> bool:
    """Whether `tree` holds an adapted weight or bias delta that no layer in `consumed`
    (paths of weights and biases, as a Linen scope names them) adapted."""
    flat = _tree.flatten(tree) if isinstance(tree, Mapping) else {}
    return any(
        not _is_consumed(_tree.base_of(p), consumed)
        for p in flat
        if _tree.leaf_name(p).endswith((_tree.A_SUFFIX, _tree.DELTA_SUFFIX, _tree.BANK_A))
    )


def _is_consumed(path: _tree.Path, consumed: set[_tree.Path]) -> bool:
    """A Linen scope names a weight from the model's root, without what the tree passed to
    ``fn`` holds it under (``{"params": ...}``, or a caller's own nesting): a tree path is
    consumed when it ends with a consumed one."""
    return any(path[len(path) - len(c) :] == c for c in consumed if len(c) <= len(path))


def call(fn: Callable, args: tuple, kwargs: dict, consumed: set[_tree.Path], dropout: float) -> Any:
    """``fn(*args, **kwargs)`` (``args[0]`` the adapted tree) with every adapted weight not
    in `consumed` after the trace adapted by the rewrite. `consumed` fills while ``fn``
    is traced (the interceptor adds to it)."""
    flat = _tree.flatten(args[0])
    strip = isinstance(args[0], nnx.State)
    passed = {p: leaf for p, leaf in flat.items() if not (strip and _tree.is_adapter_leaf(p))}
    closed, out_tree, leaves, first_leaf = _trace(fn, args, kwargs, passed)
    values_of = {p: _tree.value(leaf) for p, leaf in flat.items()}
    for p in flat:
        name, owner = _tree.leaf_name(p), _tree.base_of(p) if _tree.is_adapter_leaf(p) else p
        if _is_consumed(owner, consumed):
            continue
        if name.endswith(_tree.A_SUFFIX):
            _check_supported(owner, values_of, dropout)
            a, b, s = (values_of[_tree.lora_path(owner, x)] for x in _SINGLE)
            i = first_leaf[owner]
            leaves[i] = _rewrite.track(_tree.path_str(owner), leaves[i], a, b, s)
        elif name.endswith(_tree.DELTA_SUFFIX):
            if owner not in first_leaf:
                raise ValueError(
                    f"lj.apply: {_tree.path_str(p)} is a bias delta, but the tree has no "
                    f"{_tree.path_str(owner)} to add it to; the adapter was made for another "
                    "model."
                )
            i = first_leaf[owner]
            leaves[i] = leaves[i] + values_of[p].astype(leaves[i].dtype)
        elif name.endswith(_tree.BANK_A):
            raise ValueError(
                f"lj.apply: {_tree.path_str(owner)} has an adapter bank, but no nn.Dense, "
                "DenseGeneral, Einsum or Embed owns it; banks (adapter_ids) reach those stock "
                "Linen layers only. Merge one adapter with lj.merge(params, adapter_id=i) instead."
            )
    return jax.tree.unflatten(out_tree, _rewrite.evaluate(closed, leaves))


def _trace(fn: Callable, args: tuple, kwargs: dict, passed: dict[_tree.Path, Any]):
    """``fn`` traced on the tree of `passed` leaves and the array leaves of the other
    arguments (the rest stay static): (closed jaxpr, output treedef, its flat inputs,
    {path: index of the leaf's first input})."""
    values = [_tree.value(leaf) for leaf in passed.values()]
    rest, rest_def = jax.tree.flatten((args[1:], kwargs))
    dynamic = [i for i, leaf in enumerate(rest) if isinstance(leaf, (jax.Array, np.ndarray))]

    def traced(values, dynamic_values):
        leaves = list(rest)
        for i, v in zip(dynamic, dynamic_values, strict=True):
            leaves[i] = v
        more_args, more_kwargs = jax.tree.unflatten(rest_def, leaves)
        rebuilt = {p: _tree.wrap_like(leaf, v) for (p, leaf), v in zip(passed.items(), values)}
        return fn(_tree.unflatten_like(args[0], rebuilt), *more_args, **more_kwargs)

    inputs = (values, [rest[i] for i in dynamic])
    closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(*inputs)
    first_leaf, offset = {}, 0
    for p, v in zip(passed, values, strict=True):
        first_leaf[p] = offset
        offset += len(jax.tree.leaves(v))
    return closed, jax.tree.structure(out_shape), jax.tree.leaves(inputs), first_leaf


_SINGLE = (_tree.A_SUFFIX, _tree.B_SUFFIX, _tree.SCALE_SUFFIX)


def _check_supported(weight: _tree.Path, values_of: Mapping, dropout: float) -> None:
    where = _tree.path_str(weight)
    if isinstance(values_of[weight], QuantizedArray):
        raise ValueError(
            f"lj.apply: {where} is quantized, but only the kernels of nn.Dense, DenseGeneral "
            "and Einsum run quantized; leave it out of lj.quantize's targets."
        )
    if _tree.lora_path(weight, _tree.MAGNITUDE_SUFFIX) in values_of:
        raise ValueError(
            f"lj.apply: {where} has a DoRA magnitude, but no nn.Dense, DenseGeneral or Einsum "
            "owns it; DoRA reaches those stock Linen layers only. Use plain LoRA "
            "(use_dora=False) for this weight, or run the model on lj.merge(params)."
        )
    if dropout:
        raise ValueError(
            f"lj.apply: dropout={dropout} reaches stock Linen layers only, and {where} is "
            "adapted outside them (an NNX or custom layer); pass dropout=0.0."
        )
