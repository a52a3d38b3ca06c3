"""lj.apply: the factored forward equals materialize and merge, and trains A/B only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from flax_fixtures import MLP, Attention, EinsumNet, ScannedLM, init_variables, perturb_factors

F32 = dict(rtol=1e-5, atol=1e-5)  # float32: only summation order differs


def _setup(model, x, targets, layout=False, key=0, **config):
  variables = init_variables(model, x, key)
  lay = lj.infer_layout(model.apply, variables, x) if layout else None
  cfg = lj.LoraConfig(rank=config.pop("rank", 4), alpha=8.0, targets=targets, **config)
  adapted = lj.init(jax.random.key(key + 1), variables["params"], cfg, layout=lay)
  return variables["params"], adapted


CASES = {
    "mlp": (MLP(), jnp.linspace(-1, 1, 3 * 24).reshape(3, 24), r".*/kernel", False),
    "dense_general_attention": (Attention(), jnp.linspace(-1, 1, 2 * 5 * 24).reshape(2, 5, 24),
                                r"(q_proj|v_proj|o_proj)/kernel", True),
    "scanned_transformer": (ScannedLM(), (jnp.arange(14).reshape(2, 7) * 5) % 56,
                            r"layers/(q_proj|v_proj|up_proj)/kernel", False),
    "embedding": (ScannedLM(), (jnp.arange(14).reshape(2, 7) * 5) % 56,
                  r"embed_tokens/embedding", False),
    "flax_multi_head_attention": (
        nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=24),
        jnp.linspace(-1, 1, 2 * 5 * 24).reshape(2, 5, 24), r"(query|value|out)/kernel", False),
    "einsum": (EinsumNet(), jnp.linspace(-1, 1, 2 * 5 * 24).reshape(2, 5, 24),
               r".*/kernel", True),
}


@pytest.mark.parametrize("case", CASES)
def test_adapted_model_starts_equal_to_base(case):
  model, x, targets, layout = CASES[case]
  base, adapted = _setup(model, x, targets, layout)
  np.testing.assert_array_equal(lj.apply(model.apply)({"params": adapted}, x),
                                model.apply({"params": base}, x))


@pytest.mark.parametrize("case", CASES)
def test_factored_equals_materialize_equals_merge(case):
  model, x, targets, layout = CASES[case]
  base, adapted = _setup(model, x, targets, layout)
  adapted = perturb_factors(adapted, jax.random.key(7))
  factored = lj.apply(model.apply)({"params": adapted}, x)
  materialized = model.apply({"params": lj.materialize(adapted)}, x)
  merged = model.apply({"params": lj.merge(adapted)}, x)
  base_out = model.apply({"params": base}, x)
  assert not np.allclose(factored, base_out, atol=1e-3)  # the adapter does something
  np.testing.assert_allclose(factored, materialized, **F32)
  np.testing.assert_allclose(factored, merged, **F32)


def test_bias_deltas_take_effect_in_every_path():
  model, x = MLP(), jnp.linspace(-1, 1, 3 * 24).reshape(3, 24)
  _, adapted = _setup(model, x, r"fc1/kernel", bias="all")
  adapted = perturb_factors(adapted, jax.random.key(3))
  factored = lj.apply(model.apply)({"params": adapted}, x)
  np.testing.assert_allclose(factored, model.apply({"params": lj.merge(adapted)}, x), **F32)
  # Second code path, by hand: fc2(gelu(x(W1 + sA1B1) + b1 + d1)) + b2 + d2.
  p = adapted
  w1 = p["fc1"]["kernel"] + p["fc1"]["kernel_lora_scale"] * p["fc1"]["kernel_lora_a"] @ p["fc1"]["kernel_lora_b"]
  h = nn.gelu(x @ w1 + p["fc1"]["bias"] + p["fc1"]["bias_lora_delta"])
  by_hand = h @ p["fc2"]["kernel"] + p["fc2"]["bias"] + p["fc2"]["bias_lora_delta"]
  np.testing.assert_allclose(factored, by_hand, **F32)


def test_bfloat16_merged_matches_unmerged():
  model = MLP(hidden=64, features=32)
  x = jnp.linspace(-1, 1, 4 * 32).reshape(4, 32).astype(jnp.bfloat16)
  variables = init_variables(model, x)
  base = jax.tree.map(lambda w: w.astype(jnp.bfloat16), variables["params"])
  adapted = perturb_factors(lj.init(jax.random.key(1), base, lj.LoraConfig(4, 8, ".*kernel")),
                            jax.random.key(2), scale=0.1)
  merged = lj.merge(adapted)
  assert all(w.dtype == jnp.bfloat16 for w in jax.tree.leaves(merged))
  factored = lj.apply(model.apply)({"params": adapted}, x).astype(jnp.float32)
  # bfloat16 keeps 8 bits of mantissa: merging rounds W + ΔW once more, ~1e-2.
  np.testing.assert_allclose(factored, model.apply({"params": merged}, x).astype(jnp.float32),
                             rtol=2e-2, atol=2e-2)


def _loss_fns(model, x):
  def loss(params):
    return jnp.mean(jnp.square(lj.apply(model.apply)({"params": params}, x)))
  return loss


def test_gradients_reach_every_factor_and_only_factors():
  model, x = ScannedLM(), (jnp.arange(14).reshape(2, 7) * 5) % 56
  _, adapted = _setup(model, x, r"layers/(q_proj|v_proj)/kernel|embed_tokens/embedding")
  adapted = perturb_factors(adapted, jax.random.key(4))
  frozen, trainable = lj.split(adapted)
  loss = _loss_fns(model, x)
  grads = jax.grad(lambda t: loss(lj.combine(frozen, t)))(trainable)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(grads)]
  assert all("_lora_a" in n or "_lora_b" in n for n in names)
  for name, g in zip(names, jax.tree.leaves(grads)):
    assert float(jnp.abs(g).max()) > 0, f"zero gradient for {name}"
  # A second code path: gradients through materialize agree.
  via_materialize = jax.grad(lambda t: jnp.mean(jnp.square(model.apply(
      {"params": lj.materialize(lj.combine(frozen, t))}, x))))(trainable)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, via_materialize)


def test_dropout_uses_the_dropout_stream_and_is_off_without_it():
  model, x = MLP(), jnp.linspace(-1, 1, 3 * 24).reshape(3, 24)
  base, adapted = _setup(model, x, r".*/kernel")
  adapted = perturb_factors(adapted, jax.random.key(5))
  apply = lj.apply(model.apply, dropout=0.5)
  deterministic = apply({"params": adapted}, x)
  np.testing.assert_array_equal(deterministic, lj.apply(model.apply)({"params": adapted}, x))
  drop1 = apply({"params": adapted}, x, rngs={"dropout": jax.random.key(1)})
  drop1_again = apply({"params": adapted}, x, rngs={"dropout": jax.random.key(1)})
  drop2 = apply({"params": adapted}, x, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(drop1, drop1_again)
  assert not np.allclose(drop1, deterministic) and not np.allclose(drop1, drop2)
  # Only the adapter's input is dropped: with B = 0 the output is the base's.
  _, fresh = _setup(model, x, r".*/kernel")
  np.testing.assert_allclose(apply({"params": fresh}, x, rngs={"dropout": jax.random.key(1)}),
                             model.apply({"params": base}, x), **F32)


def test_dense_general_with_an_unreadable_layout_is_a_clear_error():
  """A bias-free (heads, head_dim, embed) kernel reads as one input axis by default."""
  class Out(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral(8, axis=(-2, -1), use_bias=False, name="o_proj")(x)

  model, x = Out(), jnp.ones((2, 5, 4, 6))
  _, adapted = _setup(model, x, r"o_proj/kernel", layout=False)
  with pytest.raises(ValueError, match="infer_layout"):
    lj.apply(model.apply)({"params": adapted}, x)


def test_unsupported_layer_is_a_clear_error():
  class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x @ self.param("kernel", nn.initializers.normal(), (x.shape[-1], 8))

  x = jnp.ones((2, 6))
  variables = Custom().init(jax.random.key(0), x)
  adapted = lj.init(jax.random.key(1), variables["params"], lj.LoraConfig(2, 4, "kernel"))
  with pytest.raises(TypeError, match="materialize"):
    lj.apply(Custom().apply)({"params": adapted}, x)


def _dot_output_shapes(jaxpr):
  """Shapes of every dot_general output in a jaxpr, sub-jaxprs (scan, remat, pjit) included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      shapes += [tuple(v.aval.shape) for v in eqn.outvars]
    for param in eqn.params.values():
      subs = param if isinstance(param, (list, tuple)) else [param]
      for sub in subs:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          shapes += _dot_output_shapes(inner)
  return shapes


def test_training_step_forms_no_weight_sized_matmul():
  """No dW of the frozen weights and no ΔW: no dot_general yields a fan_in×fan_out array."""
  model, x = ScannedLM(vocab=56, dim=24, layers=2), (jnp.arange(14).reshape(2, 7) * 5) % 56
  _, adapted = _setup(model, x, r"layers/(q_proj|v_proj|up_proj)/kernel")
  frozen, trainable = lj.split(perturb_factors(adapted, jax.random.key(6)))
  tx = lj.optimizer(optax.adamw(1e-3), trainable)
  loss = _loss_fns(model, x)

  def step(frozen, trainable, opt_state, forward):
    grads = jax.grad(lambda t: forward(lj.combine(frozen, t)))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  weight_shapes = {(24, 24), (24, 40), (40, 24)}  # q/v (D, D), up (D, F), and transposes
  factored = _dot_output_shapes(jax.make_jaxpr(lambda *a: step(*a, loss))(
      frozen, trainable, tx.init(trainable)).jaxpr)
  assert factored and not [s for s in factored if s[-2:] in weight_shapes]
  # The check can fail: the materialize path does form ΔW = A·B.
  dense = lambda p: jnp.mean(jnp.square(model.apply({"params": lj.materialize(p)}, x)))
  materialized = _dot_output_shapes(jax.make_jaxpr(lambda *a: step(*a, dense))(
      frozen, trainable, tx.init(trainable)).jaxpr)
  assert [s for s in materialized if s[-2:] in weight_shapes]
