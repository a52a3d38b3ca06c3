"""split / combine / trainable_mask / optimizer, on Linen dicts and nnx.State."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax as lj

import tolerances as tol
from flax_fixtures import MLP, ScannedLM, init_variables, perturb_factors


def _adapted(model=MLP(), x=jnp.ones((2, 24)), targets=r".*/kernel", rank=4):
    params = init_variables(model, x)["params"]
    return params, lj.init(jax.random.key(1), params, lj.LoraConfig(rank, 8, targets))


def _nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_split_and_combine_round_trip():
    base, adapted = _adapted()
    frozen, trainable = lj.split(adapted)
    assert _nbytes(frozen) + _nbytes(trainable) == _nbytes(adapted)
    assert {k for k in trainable["fc1"]} == {"kernel_lora_a", "kernel_lora_b"}
    assert lj.combine(frozen, trainable) == adapted
    mask = lj.trainable_mask(adapted)
    assert mask["fc1"] == {
        "kernel": False,
        "bias": False,
        "kernel_lora_a": True,
        "kernel_lora_b": True,
        "kernel_lora_scale": False,
    }


def test_combine_rejects_trees_from_different_bases():
    _, adapted = _adapted()
    _, other = _adapted(MLP(hidden=32))
    frozen, _ = lj.split(adapted)
    _, other_trainable = lj.split(other)
    with pytest.raises(ValueError, match=r"fc1/kernel: the adapter does not fit"):
        lj.combine(frozen, other_trainable)
    renamed = {"extra": other_trainable["fc1"]}
    with pytest.raises(ValueError, match=r"extra/kernel_lora_a: no weight 'extra/kernel'"):
        lj.combine(frozen, renamed)
    with pytest.raises(ValueError, match="in both trees"):
        lj.combine(adapted, lj.split(adapted)[1])


@pytest.mark.parametrize("rank", [1, 4])
def test_optimizer_state_exists_only_for_trainable_leaves(rank):
    model, x = ScannedLM(), jnp.zeros((1, 4), jnp.int32)
    _, adapted = _adapted(model, x, r"layers/(q_proj|v_proj)/kernel", rank)
    tx = lj.optimizer(optax.adamw(1e-3), adapted)
    state = tx.init(adapted)
    trainable_bytes = 3 * rank * (24 + 24) * 2 * 4  # layers·r·(in+out)·targets·float32
    # Adam: two moments per trainable leaf, plus its int32 step count.
    assert _nbytes(state) == 2 * trainable_bytes + 4
    # A full fine-tuning AdamW state, for scale: two moments of every base parameter.
    base_bytes = _nbytes(lj.split(adapted)[0]) - 3 * 2 * 4  # minus the frozen scales
    assert _nbytes(optax.adamw(1e-3).init(lj.merge(adapted))) == 2 * base_bytes + 4


def test_optimizer_updates_factors_and_leaves_the_base_alone():
    _, adapted = _adapted()
    adapted = perturb_factors(adapted, jax.random.key(2))
    tx = lj.optimizer(optax.sgd(0.1), adapted)
    grads = jax.tree.map(jnp.ones_like, adapted)  # even a gradient for frozen leaves is ignored
    updates, _ = tx.update(grads, tx.init(adapted), adapted)
    new = optax.apply_updates(adapted, updates)
    np.testing.assert_array_equal(new["fc1"]["kernel"], adapted["fc1"]["kernel"])
    np.testing.assert_array_equal(
        new["fc1"]["kernel_lora_scale"], adapted["fc1"]["kernel_lora_scale"]
    )
    # A − 0.1·1: the same float32 rounding on both sides, exactly equal.
    np.testing.assert_array_equal(
        new["fc1"]["kernel_lora_a"], adapted["fc1"]["kernel_lora_a"] - 0.1
    )


def test_optimizer_without_trainable_leaves_is_an_error():
    base, _ = _adapted()
    with pytest.raises(ValueError, match="no trainable leaf"):
        lj.optimizer(optax.adam(1e-3), base)
    with pytest.raises(ValueError, match="selects no trainable leaf"):
        lj.optimizer(optax.adam(1e-3), base, jax.tree.map(lambda _: False, base))


def test_masks_for_bitfit_and_full_fine_tuning():
    base, _ = _adapted()
    frozen, biases = lj.split(base, lj.bias_mask)  # BitFit: a mask function, as in optax
    assert lj.split(base, lj.bias_mask(base))[1] == biases  # or the mask tree itself
    assert {k: set(v) for k, v in biases.items()} == {"fc1": {"bias"}, "fc2": {"bias"}}
    assert lj.combine(frozen, biases) == base
    # The mask function fits the trainable half too: every leaf of it has state.
    tx = lj.optimizer(optax.adam(1e-3), biases, lj.bias_mask)
    assert _nbytes(tx.init(biases)) == 2 * _nbytes(biases) + 4
    tx = lj.optimizer(optax.adam(1e-3), base, lj.bias_mask)  # or the whole tree
    assert _nbytes(tx.init(base)) == 2 * _nbytes(biases) + 4
    everything = jax.tree.map(lambda _: True, base)  # full fine-tuning
    assert lj.split(base, everything) == ({}, base)
    with pytest.raises(ValueError, match="selects no trainable leaf"):
        lj.split(base, jax.tree.map(lambda _: False, base))
    with pytest.raises(ValueError, match="no entry for fc2/bias"):
        lj.split(base, {"fc1": everything["fc1"], "fc2": {"kernel": True}})


def test_flatten_paths_round_trips_through_path_strings():
    _, adapted = _adapted()
    flat = lj.flatten_paths(adapted)
    assert "fc1/kernel_lora_a" in flat and len(flat) == len(jax.tree.leaves(adapted))
    assert lj.unflatten_paths(flat) == adapted
    _, state = nnx.split(NnxMLP(nnx.Rngs(0)))
    assert isinstance(lj.unflatten_paths(lj.flatten_paths(state), like=state), nnx.State)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(24, 40, rngs=rngs)
        self.fc2 = nnx.Linear(40, 24, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.gelu(self.fc1(x)))


def test_nnx_state_through_materialize_merge_and_nnx_merge():
    graphdef, state = nnx.split(NnxMLP(nnx.Rngs(0)))
    adapted = lj.init(jax.random.key(1), state, lj.LoraConfig(4, 8, r".*/kernel"))
    assert isinstance(adapted, nnx.State)
    assert adapted["fc1"]["kernel"] is state["fc1"]["kernel"]
    assert isinstance(adapted["fc1"]["kernel_lora_a"], nnx.Param)
    adapted = perturb_factors(adapted, jax.random.key(2))
    frozen, trainable = lj.split(adapted)
    assert set(trainable["fc1"]) == {"kernel_lora_a", "kernel_lora_b"}
    x = jnp.linspace(-1, 1, 3 * 24).reshape(3, 24)
    merged_model = nnx.merge(graphdef, lj.merge(lj.combine(frozen, trainable)))
    materialized_model = nnx.merge(graphdef, lj.materialize(adapted))
    # A second code path, by hand, from the adapted state's raw arrays.
    p = {k: {n: v.get_value() for n, v in adapted[k].items()} for k in ("fc1", "fc2")}
    w = lambda m: (
        p[m]["kernel"] + p[m]["kernel_lora_scale"] * p[m]["kernel_lora_a"] @ p[m]["kernel_lora_b"]
    )
    by_hand = nnx.gelu(x @ w("fc1") + p["fc1"]["bias"]) @ w("fc2") + p["fc2"]["bias"]
    # float32 paths that differ in rounding only: fc1 (24 + r), gelu, fc2 (40 + r), bias adds.
    atol = tol.chain_atol(24 + 4 + 40 + 4 + 4 * tol.ELEMENTWISE, tol.scale_of(by_hand))
    tol.assert_close(merged_model(x), by_hand, atol)
    tol.assert_close(materialized_model(x), by_hand, atol)

    # Gradients through the NNX materialize path reach the factors.
    def loss(t):
        return jnp.mean(nnx.merge(graphdef, lj.materialize(lj.combine(frozen, t)))(x) ** 2)

    grads = jax.grad(loss)(trainable)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    # lj.optimizer keeps the State's structure and gives frozen leaves no state.
    tx = lj.optimizer(optax.adam(1e-3), adapted)
    assert _nbytes(tx.init(adapted)) == 2 * _nbytes(trainable) + 4
