"""lj.merge / lj.unmerge / lj.materialize: structure, dtypes, inverse, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj
from flax_fixtures import MLP, ScannedLM, init_variables, perturb_factors


def _adapted(bias="none", dtype=jnp.float32):
  params = init_variables(MLP(), jnp.ones((2, 24)))["params"]
  params = jax.tree.map(lambda w: w.astype(dtype), params)
  adapted = lj.init(jax.random.key(1), params, lj.LoraConfig(4, 8, r".*/kernel", bias=bias))
  return params, perturb_factors(adapted, jax.random.key(2))


def test_merge_is_w_plus_scaled_ba_with_the_base_structure():
  base, adapted = _adapted()
  merged = lj.merge(adapted)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  fc1 = adapted["fc1"]
  expected = np.asarray(fc1["kernel"], np.float64) + float(fc1["kernel_lora_scale"]) * (
      np.asarray(fc1["kernel_lora_a"], np.float64) @ np.asarray(fc1["kernel_lora_b"], np.float64))
  np.testing.assert_allclose(merged["fc1"]["kernel"], expected, rtol=1e-6, atol=1e-6)


def test_merge_keeps_bfloat16_dtypes():
  base, adapted = _adapted(dtype=jnp.bfloat16)
  merged = lj.merge(adapted)
  assert jax.tree.map(lambda w: w.dtype, merged) == jax.tree.map(lambda w: w.dtype, base)


def test_scanned_merge_folds_each_layer_with_its_own_factors():
  params = init_variables(ScannedLM(), jnp.zeros((1, 4), jnp.int32))["params"]
  adapted = perturb_factors(
      lj.init(jax.random.key(1), params, lj.LoraConfig(2, 4, r"layers/q_proj/kernel")),
      jax.random.key(3))
  q = adapted["layers"]["q_proj"]
  merged = lj.merge(adapted)["layers"]["q_proj"]["kernel"]
  for layer in range(3):
    expected = q["kernel"][layer] + q["kernel_lora_scale"][layer] * (
        q["kernel_lora_a"][layer] @ q["kernel_lora_b"][layer])
    np.testing.assert_allclose(merged[layer], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", ["none", "all"])
def test_unmerge_inverts_merge(bias):
  _, adapted = _adapted(bias=bias)
  restored = lj.unmerge(lj.merge(adapted), lj.adapter(adapted))
  assert jax.tree.structure(restored) == jax.tree.structure(adapted)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               restored, adapted)


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
@given(stack=st.lists(st.integers(1, 3), max_size=2), ins=st.lists(st.integers(1, 4), min_size=1, max_size=2),
       outs=st.lists(st.integers(1, 4), min_size=1, max_size=2), rank=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_merge_matches_the_matrix_definition_for_any_layout(stack, ins, outs, rank, seed):
  """ΔW is s·A·B of the (fan_in × fan_out) matricisation, per stacked slice (numpy float64)."""
  rank = min(rank, math.prod(ins), math.prod(outs))
  shape = (*stack, *ins, *outs)
  layout = {"w/kernel": lj.Layout(len(stack), len(ins))}
  base = {"w": {"kernel": jax.random.normal(jax.random.key(seed), shape)}}
  adapted = perturb_factors(lj.init(jax.random.key(seed + 1), base,
                                    lj.LoraConfig(rank, 3.0, "w/kernel"), layout=layout),
                            jax.random.key(seed + 2))
  w = adapted["w"]
  s, fan_in, fan_out = math.prod(stack), math.prod(ins), math.prod(outs)
  a = np.asarray(w["kernel_lora_a"], np.float64).reshape(s, fan_in, rank)
  b = np.asarray(w["kernel_lora_b"], np.float64).reshape(s, rank, fan_out)
  expected = np.asarray(w["kernel"], np.float64) + (3.0 / rank * a @ b).reshape(shape)
  merged = lj.merge(adapted)["w"]["kernel"]
  np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-5)
  restored = lj.unmerge(lj.merge(adapted), adapted)
  np.testing.assert_allclose(restored["w"]["kernel"], w["kernel"], rtol=1e-5, atol=1e-5)
