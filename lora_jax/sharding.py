"""Every sharding rule of the adapter, in one place.

A factor follows the weight it adapts: for W with axes (*stack, *in, *out)
and a spec (or logical axis names) ``(*S, *I, *O)``,

  A (*stack, *in, r)   gets  (*S, *I, None)
  B (*stack, r, *out)  gets  (*S, None, *O)
  s (*stack,)          gets  (*S)
  m (*stack, *out)     gets  (*S, *O)           (DoRA's magnitude)
  a bias delta         gets  the bias's spec

The rank axis is always replicated: it is tiny, and sharding it would turn the
two thin matmuls of the factored forward into collectives. A bank's factors
(`lj.stack`) carry an adapter axis of n slots after the stacked axes, also
replicated (every example may pick any slot):

  A_bank (*stack, n, *in, R)   gets  (*S, None, *I, None)
  B_bank (*stack, n, R, *out)  gets  (*S, None, None, *O)
  s_bank, rank_bank (*stack, n) get  (*S, None)
"""

from __future__ import annotations

from typing import Any

from jax.sharding import PartitionSpec

from lora_jax import _bank, _layout, _tree


def partition_specs(base_specs: Any, params: Any) -> Any:
    """Specs for an adapted tree, given those of its base tree.

    Args:
      base_specs: a tree shaped like the *base* params whose leaves are
        ``PartitionSpec``s or tuples of logical axis names (``("embed", "heads")``;
        map them to mesh axes with ``flax.linen.logical_to_mesh_axes``).
      params: the adapted tree (arrays or ``jax.ShapeDtypeStruct``s).

    Returns:
      A tree shaped like `params` with a spec of the same kind for every leaf.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from jax.sharding import PartitionSpec as P
      >>> p = lj.init(jax.random.key(0), {"d": {"kernel": jnp.ones((8, 4))}},
      ...             lj.LoraConfig(2, 4, ".*kernel"))
      >>> specs = lj.partition_specs({"d": {"kernel": P("fsdp", "tensor")}}, p)
      >>> specs["d"]["kernel_lora_a"], specs["d"]["kernel_lora_b"]
      (P('fsdp', None), P(None, 'tensor'))
    """
    flat_specs = _tree.flatten(base_specs) if not isinstance(base_specs, PartitionSpec) else {}
    flat = _tree.flatten(params)
    out = {}
    for path in flat:
        base = _tree.base_of(path) if _tree.is_adapter_leaf(path) else path
        if base not in flat_specs:
            raise ValueError(
                f"partition_specs: no spec for {_tree.path_str(base)!r}; base_specs "
                "must be shaped like the base params tree."
            )
        spec = flat_specs[base]
        if not _tree.is_adapter_leaf(path) or _tree.leaf_name(path).endswith(_tree.DELTA_SUFFIX):
            out[path] = spec
            continue
        name = _tree.leaf_name(path)
        is_bank = _tree.is_bank_leaf(path)
        suffixes = (
            _tree.BANK_SUFFIXES if is_bank else (_tree.A_SUFFIX, _tree.B_SUFFIX, _tree.SCALE_SUFFIX)
        )
        shapes = [_tree.value(flat[_tree.lora_path(base, x)]).shape for x in suffixes]
        w_shape = _tree.value(flat[base]).shape
        check = _bank.check_fits if is_bank else _layout.check_fits
        lay = check(_tree.path_str(base), w_shape, *shapes)
        axes = tuple(spec) + (None,) * (len(w_shape) - len(tuple(spec)))
        stack, ins, outs = _layout.split(axes, lay)
        make = PartitionSpec if isinstance(spec, PartitionSpec) else (lambda *xs: xs)
        if is_bank:  # the adapter axis after the stacked ones, replicated
            stack = (*stack, None)
        if name.endswith((_tree.A_SUFFIX, _tree.BANK_A)):
            out[path] = make(*stack, *ins, None)
        elif name.endswith((_tree.B_SUFFIX, _tree.BANK_B)):
            out[path] = make(*stack, None, *outs)
        elif name.endswith(_tree.MAGNITUDE_SUFFIX):  # DoRA's m: one value per output
            out[path] = make(*stack, *outs)
        else:
            out[path] = make(*stack)
    return _tree.unflatten_like(params, out)
