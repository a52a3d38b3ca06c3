"""Many adapters of one base in one tree: `stack`, `unstack`, `put`, and a slot as an adapter.

A *bank* of n adapters keeps, beside each weight W (*stack, *in, *out) that any of them
adapts (``kernel`` here)::

  kernel_bank_a      (*stack, n, *in, R)   each adapter's A, its rank zero-padded to R
  kernel_bank_b      (*stack, n, R, *out)  each adapter's B, likewise
  kernel_bank_scale  (*stack, n)  float32  each adapter's s; 0 where it lacks this target
  kernel_bank_rank   (*stack, n)  int32    each adapter's own rank here; 0: lacks it

R is the largest rank any adapter has at that weight. The adapter axis leads the matrix
part and follows the stacked (``nn.scan``) axes, so a scan over layers still slices the
layers; without stacked axes it is the leading axis. The padded rows of A and columns of B
are zero, so slot i computes exactly adapter i's s·A·B, and a slot without the target adds
nothing. The rank leaf is what makes `unstack` exact (each adapter's own rank and targets).
The names are `lora_jax._tree`'s: `lj.combine(base, bank)` checks the bank's shapes against
the weights (`check_fits`), `lj.trainable_mask` and `lj.split` train A and B (not s or the
ranks), `lj.partition_specs` replicates the adapter axis, `lj.summary` counts the bank.
Bias deltas do not go into a bank (merge them into the base first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _layout, _tree
from lora_jax._layout import Layout
from lora_jax._tree import BANK_A, BANK_B, BANK_RANK, BANK_SCALE, BANK_SUFFIXES, is_bank_leaf

ADAPTER_SUFFIXES = (_tree.A_SUFFIX, _tree.B_SUFFIX, _tree.SCALE_SUFFIX)


def bank_path(weight: _tree.Path, suffix: str) -> _tree.Path:
    return _tree.sibling(weight, _tree.leaf_name(weight) + suffix)


def banked_weights(flat: dict) -> list[_tree.Path]:
    """Paths of the weights that have a bank, in tree order."""
    return [
        _tree.sibling(p, _tree.leaf_name(p)[: -len(BANK_A)])
        for p in flat
        if _tree.leaf_name(p).endswith(BANK_A)
    ]


def has_bank(params: Any) -> bool:
    """Whether `params` hold an adapter bank (from `stack`)."""
    return any(is_bank_leaf(p) for p in _tree.flatten(params))


def bank_parts(flat: dict, weight: _tree.Path) -> tuple[jax.Array, ...]:
    """(A, B, s, rank) of the bank at `weight`; a ValueError naming a missing leaf."""
    parts = []
    for suffix in BANK_SUFFIXES:
        path = bank_path(weight, suffix)
        if path not in flat:
            raise ValueError(
                f"{_tree.path_str(path)} is missing: the bank is incomplete. Pass the whole "
                "tree that lj.stack returns (every *_bank_a/_bank_b/_bank_scale/_bank_rank)."
            )
        parts.append(_tree.value(flat[path]))
    return tuple(parts)


def check_fits(where: str, w_shape, a_shape, b_shape, s_shape, rank_shape) -> Layout:
    """The layout of a bank's factors at weight `where` of shape `w_shape`: one slot's (A, B,
    s without the adapter axis) must fit W as an adapter's do, and every part must hold the
    same n slots after the same stacked axes; a ValueError naming the weight otherwise."""
    n_stack = len(s_shape) - 1
    slots = {
        shape[n_stack] if len(shape) > n_stack else None
        for shape in (a_shape, b_shape, s_shape, rank_shape)
    }
    if n_stack < 0 or len(slots) != 1 or tuple(rank_shape) != tuple(s_shape):
        raise ValueError(
            f"{where}: the bank's parts (A {tuple(a_shape)}, B {tuple(b_shape)}, s "
            f"{tuple(s_shape)}, rank {tuple(rank_shape)}) do not hold one number of slots "
            "after the stacked axes; pass the tree lj.stack returns."
        )
    without = lambda shape: tuple(shape[:n_stack]) + tuple(shape[n_stack + 1 :])
    return _layout.check_fits(where, w_shape, without(a_shape), without(b_shape), without(s_shape))


def stack(adapters: Sequence[Any]) -> Any:
    """Stacks adapters of one base into one bank (see the module docstring for its leaves).

    Args:
      adapters: k ≥ 1 adapter trees (`lj.adapter(params)`, `lj.from_peft`, a checkpoint's
        trainable half with its scales), of possibly different ranks, targets and scales.
        Only their LoRA leaves are read.

    Returns:
      A tree with the ``*_bank_*`` leaves of every weight any adapter targets, in the
      first adapter's container type. `unstack(bank, i)` gives ``adapters[i]``'s leaves
      back exactly; `lj.apply` runs it with per-example ``adapter_ids``.

    Raises:
      ValueError: one line naming the adapter and weight, for an adapter with bias
        deltas or without scales, or factors that disagree in shape or dtype (not one base).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> base = {"d": {"kernel": jnp.ones((4, 3))}}
      >>> a2 = lj.adapter(lj.init(jax.random.key(0), base, lj.LoraConfig(2, 4, ".*kernel")))
      >>> a1 = lj.adapter(lj.init(jax.random.key(1), base, lj.LoraConfig(1, 4, ".*kernel")))
      >>> bank = lj.stack([a2, a1])
      >>> bank["d"]["kernel_bank_a"].shape, bank["d"]["kernel_bank_rank"].tolist()
      ((2, 4, 2), [2, 1])
      >>> lj.unstack(bank, 1)["d"]["kernel_lora_a"].shape
      (4, 1)
    """
    if not adapters:
        raise ValueError("lj.stack: give at least one adapter.")
    flats = [adapter_flat(a, i) for i, a in enumerate(adapters)]
    weights = list(dict.fromkeys(w for flat in flats for w in _tree.adapted_weights(flat)))
    template = next(iter(_tree.flatten(adapters[0]).values()))
    out = {}
    for weight in weights:
        present = [
            (i, factors(flat, weight))
            for i, flat in enumerate(flats)
            if weight in _tree.adapted_weights(flat)
        ]
        first_i, (a0, b0, s0) = present[0]
        n_stack = s0.ndim
        for i, (a, b, s) in present[1:]:
            if shapes_without_rank(a, b, s) != shapes_without_rank(a0, b0, s0) or (
                a.dtype != a0.dtype or b.dtype != b0.dtype
            ):
                raise ValueError(
                    f"lj.stack: adapter {i}'s factors at {_tree.path_str(weight)} (A {a.shape} "
                    f"{a.dtype}, B {b.shape} {b.dtype}) disagree with adapter {first_i}'s (A "
                    f"{a0.shape} {a0.dtype}, B {b0.shape} {b0.dtype}); stack adapters of one "
                    "base, cast to one dtype."
                )
        max_rank = max(a.shape[-1] for _, (a, _, _) in present)
        by_slot = dict(present)
        slots = [by_slot.get(i) for i in range(len(flats))]
        parts = {
            BANK_A: [_pad_a(f[0], max_rank) if f else _zeros_a(a0, max_rank) for f in slots],
            BANK_B: [
                _pad_b(f[1], max_rank, n_stack) if f else _zeros_b(b0, max_rank, n_stack)
                for f in slots
            ],
            BANK_SCALE: [
                f[2].astype(jnp.float32) if f else jnp.zeros_like(s0, jnp.float32) for f in slots
            ],
            BANK_RANK: [jnp.full(s0.shape, f[0].shape[-1] if f else 0, jnp.int32) for f in slots],
        }
        for suffix, arrays in parts.items():
            out[bank_path(weight, suffix)] = _tree.new_leaf_like(
                template, jnp.stack(arrays, axis=n_stack)
            )
    return _tree.unflatten_like(adapters[0], out)


def adapter_flat(adapter: Any, i: int) -> dict:
    """The LoRA leaves of adapter number `i` (named in errors), checked to be factors with
    scales and no bias delta."""
    flat = {p: leaf for p, leaf in _tree.flatten(adapter).items() if _tree.is_lora_leaf(p)}
    extra = [p for p in flat if _tree.leaf_name(p).endswith(_tree.DELTA_SUFFIX)]
    if extra:
        raise ValueError(
            f"lj.stack: adapter {i} has a bias delta ({_tree.path_str(extra[0])}); a bank holds "
            "factors only: fold the deltas into the base first."
        )
    extra = [p for p in flat if _tree.leaf_name(p).endswith(_tree.MAGNITUDE_SUFFIX)]
    if extra:
        raise ValueError(
            f"lj.stack: adapter {i} is a DoRA adapter ({_tree.path_str(extra[0])}); a bank holds "
            "plain LoRA factors only: merge DoRA adapters (lj.merge) instead."
        )
    if not _tree.adapted_weights(flat):
        raise ValueError(f"lj.stack: adapter {i} holds no LoRA factors (*_lora_a leaves).")
    for weight in _tree.adapted_weights(flat):
        for suffix in ADAPTER_SUFFIXES:
            if _tree.lora_path(weight, suffix) not in flat:
                raise ValueError(
                    f"lj.stack: adapter {i} lacks {_tree.path_str(_tree.lora_path(weight, suffix))}; "
                    "pass lj.adapter(params), which keeps the scales."
                )
    return flat


def factors(flat: dict, weight: _tree.Path) -> tuple[jax.Array, ...]:
    """(A, B, s) of the adapter `flat` at `weight`, as arrays."""
    return tuple(
        jnp.asarray(_tree.value(flat[_tree.lora_path(weight, s)])) for s in ADAPTER_SUFFIXES
    )


def shapes_without_rank(a, b, s) -> tuple:
    """The shapes of A, B and s with the rank axis left out: equal for adapters of one
    weight whatever their ranks."""
    n_stack = s.ndim
    return a.shape[:-1], b.shape[:n_stack] + b.shape[n_stack + 1 :], s.shape


def _pad_a(a: jax.Array, rank: int) -> jax.Array:
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, rank - a.shape[-1])])


def _pad_b(b: jax.Array, rank: int, n_stack: int) -> jax.Array:
    pad = [(0, 0)] * b.ndim
    pad[n_stack] = (0, rank - b.shape[n_stack])
    return jnp.pad(b, pad)


def _zeros_a(like: jax.Array, rank: int) -> jax.Array:
    return jnp.zeros(like.shape[:-1] + (rank,), like.dtype)


def _zeros_b(like: jax.Array, rank: int, n_stack: int) -> jax.Array:
    return jnp.zeros(like.shape[:n_stack] + (rank,) + like.shape[n_stack + 1 :], like.dtype)


def size(params: Any) -> int:
    """n, the number of adapter slots of the bank in `params`; a ValueError if none."""
    flat = _tree.flatten(params)
    weights = banked_weights(flat)
    if not weights:
        raise ValueError("the tree holds no adapter bank; lj.stack([...]) makes one.")
    scale = bank_parts(flat, weights[0])[2]
    return scale.shape[-1]


def _check_slot(params: Any, i) -> None:
    n = size(params)
    if isinstance(i, jax.core.Tracer):
        return
    if not (np.ndim(i) == 0 and 0 <= int(i) < n):
        raise ValueError(f"adapter {i!r} is not a slot of this bank of {n}: give 0 <= i < {n}.")


def unstack(bank: Any, i: int) -> Any:
    """Adapter `i` of a bank, exactly as it went into `stack` (or `put`).

    The same LoRA leaves (A, B, s of each target it had, and no others), shapes and dtypes.
    Reads the ranks, so `i` and the bank must be concrete (call it outside ``jit``).
    `slot` is the jittable, rank-padded view.
    """
    _check_slot(bank, i)
    flat = _tree.flatten(bank)
    template = next(iter(flat.values()))
    out = {}
    for weight in banked_weights(flat):
        a, b, s, rank = bank_parts(flat, weight)
        n_stack = s.ndim - 1
        ranks = np.unique(np.asarray(rank)[..., i])
        if ranks.size != 1:
            raise ValueError(
                f"{_tree.path_str(weight)}: adapter {i}'s rank differs across the stacked axes "
                f"({ranks.tolist()}); the bank was edited by hand."
            )
        r = int(ranks[0])
        if r == 0:
            continue
        a_i = jnp.take(a, i, axis=n_stack)[..., :r]
        b_i = jax.lax.slice_in_dim(jnp.take(b, i, axis=n_stack), 0, r, axis=n_stack)
        for suffix, leaf in zip(ADAPTER_SUFFIXES, (a_i, b_i, s[..., i]), strict=True):
            out[_tree.lora_path(weight, suffix)] = _tree.new_leaf_like(template, leaf)
    return _tree.unflatten_like(bank, out)


def slot(params: Any, i) -> dict:
    """Slot `i` of the bank in `params` as a flat adapter {path: leaf}: A, B and s of every
    banked weight at the bank's padded rank R (zeros beyond the adapter's own rank, and
    everywhere for a target it lacks). Jittable; `i` may be traced."""
    _check_slot(params, i)
    flat = _tree.flatten(params)
    out = {}
    for weight in banked_weights(flat):
        a, b, s, _ = bank_parts(flat, weight)
        n_stack = s.ndim - 1
        for suffix, part in zip(ADAPTER_SUFFIXES, (a, b, s), strict=True):
            out[_tree.lora_path(weight, suffix)] = jnp.take(part, i, axis=n_stack)
    return out


def put(bank: Any, i, adapter: Any) -> Any:
    """Writes `adapter` into slot `i` of `bank` (a hot swap); returns the new bank.

    Every leaf keeps its shape and dtype, so a jitted step or `models.generate` that ran the
    old bank runs the new one without recompiling. Pure and jittable (`i` may be traced);
    the slot's old adapter is gone, the other slots are untouched.

    Raises:
      ValueError: one line, when the adapter targets a weight the bank has no slot for,
        its rank exceeds the bank's there, or its factors do not fit.
    """
    _check_slot(bank, i)
    flat_bank = _tree.flatten(bank)
    flat_adapter = adapter_flat(adapter, 0)
    weights = banked_weights(flat_bank)
    extra = [w for w in _tree.adapted_weights(flat_adapter) if w not in weights]
    if extra:
        raise ValueError(
            f"lj.put: the adapter targets {_tree.path_str(extra[0])}, which the bank has no "
            "slot for; lj.stack the adapters with one that targets it."
        )
    out = dict(flat_bank)
    for weight in weights:
        a_bank, b_bank, s_bank, r_bank = bank_parts(flat_bank, weight)
        n_stack = s_bank.ndim - 1
        max_rank = a_bank.shape[-1]
        if weight in _tree.adapted_weights(flat_adapter):
            a, b, s = factors(flat_adapter, weight)
            r = a.shape[-1]
            expected = (
                a_bank.shape[:n_stack] + a_bank.shape[n_stack + 1 : -1],
                b_bank.shape[:n_stack] + b_bank.shape[n_stack + 2 :],
                s_bank.shape[:n_stack],
            )
            if r > max_rank or shapes_without_rank(a, b, s) != expected:
                raise ValueError(
                    f"lj.put: the adapter's factors at {_tree.path_str(weight)} (A {a.shape}, B "
                    f"{b.shape}) do not fit the bank's slots (rank <= {max_rank}, A "
                    f"{expected[0]} x r, B with {expected[1]} around r)."
                )
            new = (_pad_a(a, max_rank), _pad_b(b, max_rank, n_stack), s, jnp.full(s.shape, r))
        else:
            new = (
                _zeros_a(jnp.take(a_bank, 0, axis=n_stack), max_rank),
                _zeros_b(jnp.take(b_bank, 0, axis=n_stack), max_rank, n_stack),
                jnp.zeros(s_bank.shape[:n_stack]),
                jnp.zeros(s_bank.shape[:n_stack]),
            )
        for suffix, part, value in zip(
            BANK_SUFFIXES, (a_bank, b_bank, s_bank, r_bank), new, strict=True
        ):
            index = (slice(None),) * n_stack + (i,)
            path = bank_path(weight, suffix)
            out[path] = _tree.wrap_like(
                flat_bank[path], part.at[index].set(value.astype(part.dtype))
            )
    return _tree.unflatten_like(bank, out)


def check_ids(adapter_ids: Any) -> jax.Array:
    """`adapter_ids` as int32 (batch,); a ValueError for any other shape or an integer-less dtype."""
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"adapter_ids must be integers of shape (batch,), one bank slot per example (-1: the "
            f"base alone); got {ids.dtype} {ids.shape}."
        )
    return ids.astype(jnp.int32)


def gather(part: jax.Array, ids_B: jax.Array, axis: int) -> jax.Array:
    """`part`'s slots `ids_B` along its adapter `axis` (axis size n): the slot axis becomes a
    batch axis of size len(ids_B); ids outside [0, n) (-1: the base) give zeros."""
    n = part.shape[axis]
    inside_B = jnp.where(ids_B < 0, n, ids_B)  # take would wrap negative ids around
    return jnp.take(part, inside_B, axis=axis, mode="fill", fill_value=0)
