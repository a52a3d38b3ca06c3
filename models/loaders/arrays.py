"""Parameters as global `jax.Array`s: each process reads, converts and places only the block
of each parameter that its own (addressable) devices hold."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding, SingleDeviceSharding

from models.loaders.lazy import LazyTensor

# (model, its params as ShapeDtypeStructs) -> a tree of Shardings shaped like them
ShardingsFn = Callable[[Any, Any], Any]


def global_array(tensor: LazyTensor, sharding: Sharding, dtype: Any) -> jax.Array:
    """`tensor` as a `jax.Array` of `dtype` laid out by `sharding`.

    This process reads the smallest box of `tensor` that holds every block its devices hold
    (all of it for a single device or a replicated sharding; 1/processes of it along a
    sharded axis), converts it to `dtype` once (numpy's rounding: what `jnp.asarray` does on
    the host), and cuts each device's block from it. Host memory at the peak: that box in
    `dtype` and the devices' copies of it.
    """
    shape = tuple(tensor.shape)
    ranges = [_ranges(i, shape) for i in sharding.addressable_devices_indices_map(shape).values()]
    if not ranges:  # no device of this process is in `sharding`: nothing to read
        return jax.make_array_from_callback(shape, sharding, lambda _: None, dtype=dtype)
    box = tuple(
        slice(min(r[axis][0] for r in ranges), max(r[axis][1] for r in ranges))
        for axis in range(len(shape))
    )
    host = np.asarray(tensor[box], dtype)

    def block(index: tuple[slice, ...]) -> np.ndarray:
        return host[
            tuple(
                slice(lo - b.start, hi - b.start)
                for (lo, hi), b in zip(_ranges(index, shape), box, strict=True)
            )
        ]

    return jax.make_array_from_callback(shape, sharding, block, dtype=dtype)


def _ranges(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """A device's block (a slice per axis, as jax gives it) as (start, stop) per axis."""
    return [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]


def default_sharding() -> Sharding:
    """Where `models.load` puts parameters without `shardings`: this process's first device
    (the default device of a single-process run)."""
    return SingleDeviceSharding(jax.local_devices()[0])


def flat_shardings(model: Any, shapes: Any, shardings: ShardingsFn) -> dict[str, Sharding]:
    """{"a/b/kernel": Sharding} of every parameter in `shapes` (the unboxed abstract params of
    `model`) from the tree `shardings(model, shapes)`. Raises ValueError, one line, when that
    tree does not fit `shapes`."""
    names = list(_flat(shapes))
    given = _flat(shardings(model, shapes), is_leaf=lambda x: isinstance(x, Sharding))
    missing = [n for n in names if n not in given]
    extra = [n for n in given if n not in names]
    wrong = [n for n, s in given.items() if not isinstance(s, Sharding)]
    if missing or extra or wrong:
        raise ValueError(
            "shardings(model, shapes) must return a tree shaped like `shapes` with a "
            "jax.sharding.Sharding at every leaf; "
            + "; ".join(
                ([f"missing {missing[:5]}"] if missing else [])
                + ([f"not parameters {extra[:5]}"] if extra else [])
                + ([f"not a Sharding at {wrong[:5]}"] if wrong else [])
            )
        )
    return given


def _flat(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> Mapping[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}
