"""lj.merge / lj.unmerge / lj.materialize: structure, dtypes, inverse, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj

import tolerances as tol
from flax_fixtures import MLP, ScannedLM, init_variables, perturb_factors

RANK = 4


def _adapted(bias="none", dtype=jnp.float32):
    params = init_variables(MLP(), jnp.ones((2, 24)))["params"]
    params = jax.tree.map(lambda w: w.astype(dtype), params)
    adapted = lj.init(jax.random.key(1), params, lj.LoraConfig(RANK, 8, r".*/kernel", bias=bias))
    return params, perturb_factors(adapted, jax.random.key(2))


def _float64(layer):
    """(W, A, B, s) of one adapted kernel, in numpy float64."""
    return tuple(
        np.asarray(layer[k], np.float64)
        for k in ("kernel", "kernel_lora_a", "kernel_lora_b", "kernel_lora_scale")
    )


def _merge_bound(w, a, b, s, extra=2, sides=1):
    """A float32 W + s·A·B against the exact value: the rank-r sum, then `extra` roundings
    (·s and + W; − ΔW again for an unmerge), so the error is within γ_{r+extra}·(|W| +
    |s|·|A||B|) elementwise (tolerances.py); twice that between two float32 results."""
    magnitude = np.abs(w) + np.abs(s)[..., None, None] * (np.abs(a) @ np.abs(b))
    return tol.dot_error(magnitude, a.shape[-1] + extra, sides=sides)


def _fc1_merge(adapted):
    """(lj.merge's fc1 kernel, the float64 W + s·A·B of `adapted`'s fc1, its error bound)."""
    w, a, b, s = _float64(adapted["fc1"])
    return lj.merge(adapted)["fc1"]["kernel"], w + s * (a @ b), _merge_bound(w, a, b, s)


def test_merge_is_w_plus_scaled_ba_with_the_base_structure():
    base, adapted = _adapted()
    assert jax.tree.structure(lj.merge(adapted)) == jax.tree.structure(base)
    merged, expected, bound = _fc1_merge(adapted)
    tol.assert_close(merged, expected, bound)


def _scale_off(fc1):
    return {**fc1, "kernel_lora_scale": fc1["kernel_lora_scale"] * 1.01}


def _last_rank_dropped(fc1):
    return {**fc1, "kernel_lora_a": fc1["kernel_lora_a"].at[:, -1].set(0)}


def _one_weight_off(fc1):
    return {**fc1, "kernel_lora_b": fc1["kernel_lora_b"].at[1, 2].multiply(1.01)}


@pytest.mark.parametrize(
    "bug",
    [_scale_off, _last_rank_dropped, _one_weight_off],
    ids=["scale off by 1%", "last rank component dropped", "one element of B off by 1%"],
)
def test_the_merge_tolerance_fails_for_a_planted_bug(bug):
    _, adapted = _adapted()
    _, expected, bound = _fc1_merge(adapted)
    buggy = lj.merge({**adapted, "fc1": bug(adapted["fc1"])})["fc1"]["kernel"]
    assert not tol.close(buggy, expected, bound)


def test_merge_keeps_bfloat16_dtypes():
    base, adapted = _adapted(dtype=jnp.bfloat16)
    merged = lj.merge(adapted)
    assert jax.tree.map(lambda w: w.dtype, merged) == jax.tree.map(lambda w: w.dtype, base)


def test_scanned_merge_folds_each_layer_with_its_own_factors():
    params = init_variables(ScannedLM(), jnp.zeros((1, 4), jnp.int32))["params"]
    adapted = perturb_factors(
        lj.init(jax.random.key(1), params, lj.LoraConfig(2, 4, r"layers/q_proj/kernel")),
        jax.random.key(3),
    )
    q = adapted["layers"]["q_proj"]
    merged = lj.merge(adapted)["layers"]["q_proj"]["kernel"]
    bound = _merge_bound(*_float64(q), sides=2)  # both sides float32
    for layer in range(3):
        expected = q["kernel"][layer] + q["kernel_lora_scale"][layer] * (
            q["kernel_lora_a"][layer] @ q["kernel_lora_b"][layer]
        )
        tol.assert_close(merged[layer], expected, bound[layer])
        if layer:  # the bound tells layers apart: another layer's factors would fail it
            assert not tol.close(merged[layer - 1], expected, bound[layer])


@pytest.mark.parametrize("bias", ["none", "all"])
def test_unmerge_inverts_merge(bias):
    _, adapted = _adapted(bias=bias)
    restored = lj.unmerge(lj.merge(adapted), lj.adapter(adapted))
    assert jax.tree.structure(restored) == jax.tree.structure(adapted)
    for name, layer in adapted.items():
        w, a, b, s = _float64(layer)
        got = restored[name]
        # (W + ΔW) − ΔW: two merges' roundings and the subtraction's, within 2·γ_{r+3}·(|W| +
        # |s|·|A||B|); the bias's (b + δ) − δ within 2·γ_1·(|b| + |δ|). The factors come back as
        # they went in.
        tol.assert_close(got["kernel"], w, _merge_bound(w, a, b, s, extra=3, sides=2))
        if bias == "all":
            bias_magnitude = np.abs(layer["bias"]) + np.abs(layer["bias_lora_delta"])
            tol.assert_close(got["bias"], layer["bias"], tol.dot_error(bias_magnitude, 1, sides=2))
        else:
            np.testing.assert_array_equal(got["bias"], layer["bias"])
        for leaf in set(layer) - {"kernel", "bias"}:
            np.testing.assert_array_equal(got[leaf], layer[leaf])


def test_merging_a_tree_without_adapter_is_an_error():
    base, _ = _adapted()
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lj.merge(base)


def test_unmerge_rejects_an_adapter_for_another_base():
    _, adapted = _adapted()
    other = init_variables(MLP(hidden=32), jnp.ones((2, 24)))["params"]
    other_adapter = lj.adapter(lj.init(jax.random.key(1), other, lj.LoraConfig(4, 8, r".*/kernel")))
    with pytest.raises(ValueError, match=r"fc1/kernel: the adapter does not fit"):
        lj.unmerge(lj.merge(adapted), other_adapter)


def test_unmerge_without_scales_names_the_missing_leaf():
    _, adapted = _adapted()
    with pytest.raises(ValueError, match=r"fc1/kernel_lora_scale is missing"):
        lj.unmerge(lj.merge(adapted), lj.split(adapted)[1])


def test_unmerge_of_an_unmerged_tree_is_an_error():
    _, adapted = _adapted()
    with pytest.raises(ValueError, match="expects a merged tree"):
        lj.unmerge(adapted, lj.adapter(adapted))


@settings(max_examples=6, deadline=None)
@given(
    stack=st.lists(st.integers(1, 3), max_size=2),
    ins=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    outs=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    rank=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_merge_matches_the_matrix_definition_for_any_layout(stack, ins, outs, rank, seed):
    """ΔW is s·A·B of the (fan_in × fan_out) matricisation, per stacked slice (numpy float64)."""
    rank = min(rank, math.prod(ins), math.prod(outs))
    shape = (*stack, *ins, *outs)
    layout = {"w/kernel": lj.Layout(len(stack), len(ins))}
    base = {"w": {"kernel": jax.random.normal(jax.random.key(seed), shape)}}
    adapted = perturb_factors(
        lj.init(
            jax.random.key(seed + 1), base, lj.LoraConfig(rank, 3.0, "w/kernel"), layout=layout
        ),
        jax.random.key(seed + 2),
    )
    w = adapted["w"]
    s, fan_in, fan_out = math.prod(stack), math.prod(ins), math.prod(outs)
    a = np.asarray(w["kernel_lora_a"], np.float64).reshape(s, fan_in, rank)
    b = np.asarray(w["kernel_lora_b"], np.float64).reshape(s, rank, fan_out)
    kernel = np.asarray(w["kernel"], np.float64).reshape(s, fan_in, fan_out)
    expected = (kernel + 3.0 / rank * a @ b).reshape(shape)
    scale = np.full(s, 3.0 / rank)
    merged = lj.merge(adapted)["w"]["kernel"]  # float32 against float64
    tol.assert_close(merged, expected, _merge_bound(kernel, a, b, scale).reshape(shape))
    restored = lj.unmerge(lj.merge(adapted), adapted)
    tol.assert_close(
        restored["w"]["kernel"],
        w["kernel"],
        _merge_bound(kernel, a, b, scale, extra=3, sides=2).reshape(shape),
    )
