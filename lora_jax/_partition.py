"""Which leaves train: `split`, `combine`, `adapter`, `trainable_mask`, `bias_mask`, `optimizer`.

By default the trainable leaves are the LoRA factors A and B (of an adapter or of
a bank of adapters, `lj.stack`), DoRA magnitudes and the bias deltas; everything
else — the base weights, the scales s, a bank's ranks — is frozen. The
tree itself says which is which (see `lora_jax._tree`), so none of these needs
a config. `split` and `optimizer` also take any other *mask*, as optax does: a
tree of bools shaped like the params, or a function from params to one; e.g.
`bias_mask` (BitFit: train the base's own biases) or ``lambda p:
jax.tree.map(lambda _: True, p)`` (full fine-tuning). A mask function that
reads only the leaves' paths, as these do, fits both the whole tree and the
trainable half that `split` returns.
"""

from __future__ import annotations

from typing import Any

import optax

from lora_jax import _bank, _dora, _layout, _tree

Mask = Any  # a tree of bools shaped like the params, or a function params -> such a tree


def split(params: Any, mask: Mask | None = None) -> tuple[Any, Any]:
    """Splits a tree into (frozen, trainable) trees with disjoint leaves.

    Differentiate with respect to `trainable` only and no weight gradient of the
    frozen base is ever formed; `combine` puts the two back together. `mask`
    says which leaves train (default: `trainable_mask`, the LoRA factors and
    bias deltas of an adapted tree).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> p = lj.init(jax.random.key(0), {"d": {"kernel": jnp.ones((4, 3))}},
      ...             lj.LoraConfig(2, 4, ".*kernel"))
      >>> frozen, trainable = lj.split(p)
      >>> sorted(trainable["d"]), sorted(frozen["d"])
      (['kernel_lora_a', 'kernel_lora_b'], ['kernel', 'kernel_lora_scale'])
      >>> frozen, biases = lj.split({"d": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}},
      ...                           lj.bias_mask)  # BitFit
      >>> list(biases["d"]), list(frozen["d"])
      (['bias'], ['kernel'])
    """
    flat = _tree.flatten(params)
    trains = _trains(params, mask)
    frozen = {p: leaf for p, leaf in flat.items() if not trains[p]}
    trainable = {p: leaf for p, leaf in flat.items() if trains[p]}
    return _tree.unflatten_like(params, frozen), _tree.unflatten_like(params, trainable)


def _trains(params: Any, mask: Mask | None) -> dict:
    """{path: bool} for every leaf of `params`: does `mask` train it? Raises a
    ValueError when it trains none."""
    flat = _tree.flatten(params)
    if mask is None:
        trains = {p: _tree.is_trainable_leaf(p) for p in flat}
    else:
        flat_mask = _tree.flatten(mask(params) if callable(mask) else mask)
        missing = [p for p in flat if p not in flat_mask]
        if missing:
            raise ValueError(
                f"the mask has no entry for {_tree.path_str(missing[0])}; give a tree "
                "of bools shaped like the params, or a function params -> such a tree."
            )
        trains = {p: bool(_tree.value(flat_mask[p])) for p in flat}
    if not any(trains.values()):
        raise ValueError(
            "the tree holds no trainable leaf: no LoRA adapter (call lj.init(key, "
            "params, config) first, and give the adapted tree)"
            if mask is None
            else "the mask selects no trainable leaf of the tree"
        )
    return trains


def combine(frozen: Any, trainable: Any) -> Any:
    """Inverse of `split`. Checks that the two trees come from the same base.

    Raises:
      ValueError: naming the path, when a leaf is in both trees, when an adapter
        leaf has no weight beside it in `frozen`, or when its shape does not fit.
    """
    flat_frozen = _tree.flatten(frozen)
    flat_trainable = _tree.flatten(trainable)
    both = [p for p in flat_trainable if p in flat_frozen]
    if both:
        raise ValueError(
            f"{_tree.path_str(both[0])} is in both trees; combine takes the two "
            "disjoint halves that lj.split returns."
        )
    combined = {**flat_frozen, **flat_trainable}
    check_adapter_fits(combined)
    return _tree.unflatten_like(frozen, combined)


def check_adapter_fits(flat: dict) -> None:
    """Raises a ValueError naming the first adapter or bank leaf that does not fit its
    weight."""
    for path in flat:
        if not _tree.is_adapter_leaf(path):
            continue
        base = _tree.base_of(path)
        name = _tree.path_str(path)
        if base not in flat:
            raise ValueError(
                f"{name}: no weight {_tree.path_str(base)!r} beside it; the adapter "
                "and the base come from different models."
            )
        leaf = _tree.leaf_name(path)
        if leaf.endswith((_tree.A_SUFFIX, _tree.BANK_A)):
            get = lambda p: _tree.value(flat[p]).shape
            is_bank = leaf.endswith(_tree.BANK_A)
            partners = _tree.BANK_SUFFIXES[1:] if is_bank else (_tree.B_SUFFIX, _tree.SCALE_SUFFIX)
            parts = [_tree.lora_path(base, s) for s in partners]
            missing = [_tree.path_str(p) for p in parts if p not in flat]
            if missing:
                raise ValueError(
                    f"{name}: its partner leaves {missing} are missing; the adapter is incomplete."
                )
            if is_bank:
                _bank.check_fits(_tree.path_str(base), get(base), get(path), *map(get, parts))
                continue
            lay = _layout.check_fits(_tree.path_str(base), get(base), get(path), *map(get, parts))
            magnitude = _tree.lora_path(base, _tree.MAGNITUDE_SUFFIX)
            if magnitude in flat:
                _dora.check_magnitude(_tree.path_str(base), get(base), get(magnitude), lay)
        elif (
            _tree.leaf_name(path).endswith(_tree.DELTA_SUFFIX)
            and _tree.value(flat[path]).shape != _tree.value(flat[base]).shape
        ):
            raise ValueError(
                f"{name}: shape {_tree.value(flat[path]).shape} does not fit the "
                f"bias {_tree.value(flat[base]).shape}."
            )


def adapter(params: Any) -> Any:
    """The adapter alone: every LoRA leaf (A, B, scales, bias deltas) and bank leaf,
    nothing of the base.

    This is what an adapter checkpoint holds, and what `unmerge` takes.
    """
    flat = _tree.flatten(params)
    lora = {p: leaf for p, leaf in flat.items() if _tree.is_adapter_leaf(p)}
    if not lora:
        raise ValueError("the tree holds no LoRA adapter; call lj.init first.")
    return _tree.unflatten_like(params, lora)


def trainable_mask(params: Any) -> Any:
    """A tree of bools shaped like `params`: True for A and B (a bank's too), DoRA
    magnitudes and bias deltas.

    Use it with ``optax.masked`` or build labels for ``optax.multi_transform``;
    `optimizer` does the latter for you.
    """
    return _tree.map_with_path(
        lambda p, leaf: _tree.wrap_like(leaf, _tree.is_trainable_leaf(p)), params
    )


def bias_mask(params: Any) -> Any:
    """A tree of bools shaped like `params`: True for every leaf named ``bias``.

    BitFit (Ben Zaken et al. 2021) trains exactly these, in place: give it to
    `split` and `optimizer` as their `mask`. (Not ``LoraConfig(bias="all")``,
    which adds bias *deltas* beside LoRA factors.)

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> lj.bias_mask({"d": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}})
      {'d': {'kernel': False, 'bias': True}}
    """
    return _tree.map_with_path(
        lambda p, leaf: _tree.wrap_like(leaf, _tree.leaf_name(p) == "bias"), params
    )


def optimizer(
    tx: optax.GradientTransformation,
    params: Any,
    mask: Mask | None = None,
    *,
    loraplus_lr_ratio: float | None = None,
) -> optax.GradientTransformation:
    """Wraps `tx` so that only trainable leaves are updated and hold state.

    Frozen leaves get a zero update and **no** optimizer state at all (Adam's two
    moments exist only for A, B and bias deltas). Works on the full adapted tree
    and on the trainable half from `split` alike. `mask` says which leaves train,
    as in `split` (default: `trainable_mask`); on the trainable half of another
    mask, give the same mask function (e.g. `bias_mask`), which selects every
    leaf of it.

    With `loraplus_lr_ratio` λ (LoRA+, Hayou et al. 2024, PEFT's
    ``create_loraplus_optimizer``), the updates of B — and, as PEFT groups them, of
    the other one-axis trainables beside it: DoRA magnitudes and bias deltas — are
    multiplied by λ after `tx`: B's learning rate is λ× A's for any `tx` whose update
    is linear in its learning rate (every optax alias: sgd, adam, adamw, ...). One
    `tx` serves all leaves, so a global-norm clip inside it still sees every gradient.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> p = lj.init(jax.random.key(0), {"d": {"kernel": jnp.ones((64, 64))}},
      ...             lj.LoraConfig(2, 4, ".*kernel"))
      >>> state = lj.optimizer(optax.adam(1e-3), p).init(p)
      >>> sum(x.size for x in jax.tree.leaves(state))  # 2 moments x 2 factors + count
      513
    """
    trains = _trains(params, mask)
    labels = _tree.map_with_path(
        lambda p, leaf: _tree.wrap_like(leaf, "trainable" if trains[p] else "frozen"), params
    )
    masked = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
    if loraplus_lr_ratio is None:
        return masked
    if not loraplus_lr_ratio > 0:
        raise ValueError(
            f"lj.optimizer: loraplus_lr_ratio {loraplus_lr_ratio!r} must be positive; "
            "LoRA+ uses ratios of 2 to 16 (B's learning rate over A's)."
        )
    faster = _tree.map_with_path(
        lambda p, leaf: _tree.wrap_like(leaf, trains[p] and _tree.is_loraplus_b_leaf(p)), params
    )
    return optax.chain(masked, optax.masked(optax.scale(loraplus_lr_ratio), faster))
