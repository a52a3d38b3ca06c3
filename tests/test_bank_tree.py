"""A bank's leaves (lj.stack) in the tree functions: trainable_mask / split / optimizer
train A and B only, combine checks the bank's shapes, partition_specs replicates the adapter
axis, summary counts every slot."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import lora_jax as lj

# A plain kernel (D_in, D_out) and a scanned one (layers, D_in, D_out), as nn.scan stacks them.
BASE = {
    "dense": {"kernel": jnp.ones((6, 5)), "bias": jnp.zeros(5)},
    "layers": {"kernel": jnp.ones((3, 6, 4))},
}
SPECS = {
    "dense": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")},
    "layers": {"kernel": P(None, "fsdp", "tensor")},
}
LAYOUT = {"dense/kernel": lj.Layout(0, 1), "layers/kernel": lj.Layout(1, 1)}


def _bank(ranks=(2, 3, 1)):
    """A bank of len(ranks) adapters of BASE (adapter 1 targets only the dense kernel)."""
    adapters = [
        lj.adapter(
            lj.init(
                jax.random.key(i),
                BASE,
                lj.LoraConfig(r, 4.0, "dense/kernel" if i == 1 else ".*kernel"),
                layout=LAYOUT,
            )
        )
        for i, r in enumerate(ranks)
    ]
    return lj.stack(adapters)


def test_a_bank_trains_its_factors_and_nothing_else():
    params = lj.combine(BASE, _bank())
    flat = lj.flatten_paths(lj.trainable_mask(params))
    trained = sorted(p for p, t in flat.items() if t)
    assert trained == [
        "dense/kernel_bank_a",
        "dense/kernel_bank_b",
        "layers/kernel_bank_a",
        "layers/kernel_bank_b",
    ]
    frozen, trainable = lj.split(params)
    assert sorted(lj.flatten_paths(trainable)) == trained
    assert lj.flatten_paths(lj.combine(frozen, trainable)).keys() == flat.keys()
    # Adam's two moments exist for the trained leaves only: 2 x their sizes, plus the count.
    state = lj.optimizer(optax.adam(1e-3), params).init(params)
    sizes = sum(lj.flatten_paths(params)[p].size for p in trained)
    assert sum(x.size for x in jax.tree.leaves(state)) == 2 * sizes + 1
    assert sorted(lj.flatten_paths(lj.adapter(params))) == sorted(lj.flatten_paths(_bank()))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # A for another base's fan_in: one slot's A no longer fits W (6, 5).
        (lambda b: b["dense"].update(kernel_bank_a=jnp.ones((3, 7, 3))), "does not fit"),
        # One slot fewer in s than in A and B.
        (lambda b: b["dense"].update(kernel_bank_scale=jnp.ones(2)), "number of slots"),
        # The rank leaf of another shape than the scales.
        (lambda b: b["layers"].update(kernel_bank_rank=jnp.ones((3, 2), jnp.int32)), "slots"),
        (lambda b: b["layers"].pop("kernel_bank_b"), "partner leaves"),
        (lambda b: b.update(other={"kernel_bank_a": jnp.ones((2, 6, 2))}), "no weight"),
    ],
)
def test_combine_refuses_a_bank_that_does_not_fit(edit, message):
    bank = jax.tree.map(lambda x: x, _bank())  # a copy to edit
    edit(bank)
    with pytest.raises(ValueError, match=message):
        lj.combine(BASE, bank)


def test_bank_factors_follow_their_weight_with_the_adapter_axis_replicated():
    specs = lj.flatten_paths(lj.partition_specs(SPECS, lj.combine(BASE, _bank())))
    # The rule (lora_jax.sharding): A (*S, n, *I, R) -> (*S, None, *I, None),
    # B (*S, n, R, *O) -> (*S, None, None, *O), s and ranks (*S, n) -> (*S, None).
    assert specs["dense/kernel_bank_a"] == P(None, "fsdp", None)
    assert specs["dense/kernel_bank_b"] == P(None, None, "tensor")
    assert specs["dense/kernel_bank_scale"] == specs["dense/kernel_bank_rank"] == P(None)
    assert specs["layers/kernel_bank_a"] == P(None, None, "fsdp", None)
    assert specs["layers/kernel_bank_b"] == P(None, None, None, "tensor")
    assert specs["layers/kernel_bank_scale"] == specs["layers/kernel_bank_rank"] == P(None, None)
    assert specs["dense/kernel"] == SPECS["dense"]["kernel"]  # the base keeps its own
    # Each spec names one mesh axis (or None) per axis of its leaf.
    for path, leaf in lj.flatten_paths(lj.combine(BASE, _bank())).items():
        assert len(specs[path]) <= leaf.ndim, path


def test_summary_counts_every_slot():
    bank = _bank()
    table = lj.summary(lj.combine(BASE, bank))
    flat = lj.flatten_paths(bank)
    trained = sum(v.size for p, v in flat.items() if p.endswith(("_bank_a", "_bank_b")))
    base_total = sum(np.size(v) for v in jax.tree.leaves(BASE))
    assert f"trainable: {trained:,} of {base_total:,} base parameters" in table
    # Padded rank 3 (the largest) over 3 slots at the dense kernel, 2 at the scanned one.
    rows = {line.split()[0]: line for line in table.splitlines()[2:] if line}
    assert re.search(
        r"\) +3 x 3 +bank +" + f"{flat['dense/kernel_bank_a'].size + 3 * 3 * 5:,}",
        rows["dense/kernel"],
    )
    assert re.search(r"\) +2 x 3 +bank ", rows["layers/kernel"])
