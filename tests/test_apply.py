"""lj.apply: the factored forward equals materialize and merge, and trains A/B only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj

import tolerances as tol
from flax_fixtures import MLP, Attention, EinsumNet, ScannedLM, init_variables, perturb_factors

RANK = 4
E = tol.ELEMENTWISE


def _setup(model, x, targets, layout=False, key=0, **config):
    variables = init_variables(model, x, key)
    lay = lj.infer_layout(model.apply, variables, x) if layout else None
    cfg = lj.LoraConfig(rank=config.pop("rank", RANK), alpha=8.0, targets=targets, **config)
    adapted = lj.init(jax.random.key(key + 1), variables["params"], cfg, layout=lay)
    return variables["params"], adapted


CASES = {
    "mlp": (MLP(), jnp.linspace(-1, 1, 3 * 24).reshape(3, 24), r".*/kernel", False),
    "dense_general_attention": (
        Attention(),
        jnp.linspace(-1, 1, 2 * 5 * 24).reshape(2, 5, 24),
        r"(q_proj|v_proj|o_proj)/kernel",
        True,
    ),
    "scanned_transformer": (
        ScannedLM(),
        (jnp.arange(14).reshape(2, 7) * 5) % 56,
        r"layers/(q_proj|v_proj|up_proj)/kernel",
        False,
    ),
    "embedding": (
        ScannedLM(),
        (jnp.arange(14).reshape(2, 7) * 5) % 56,
        r"embed_tokens/embedding",
        False,
    ),
    "flax_multi_head_attention": (
        nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=24),
        jnp.linspace(-1, 1, 2 * 5 * 24).reshape(2, 5, 24),
        r"(query|value|out)/kernel",
        False,
    ),
    "einsum": (EinsumNet(), jnp.linspace(-1, 1, 2 * 5 * 24).reshape(2, 5, 24), r".*/kernel", True),
}
# n of tolerances.chain_atol for each case's output: reductions (+ RANK for an adapter beside a
# projection) and element-wise functions on the longest path through the model.
SCANNED_LM = tol.decoder_depth(layers=3, hidden=24, mlp=40, head_dim=6, keys=7, rank=RANK)
ATTENTION = 24 + RANK + 6 + 2 * 5 + 24 + RANK + 4 * E  # q/k/v, scores, softmax over 5, o_proj
DEPTHS = {
    "mlp": 24 + RANK + 40 + RANK + 4 * E,  # fc1, gelu, fc2, bias adds
    "dense_general_attention": ATTENTION,
    "scanned_transformer": SCANNED_LM,
    "embedding": SCANNED_LM,
    "flax_multi_head_attention": ATTENTION,
    "einsum": 24 + RANK + 10 + RANK + 2 * E,
}


@pytest.mark.parametrize("case", CASES)
def test_adapted_model_starts_equal_to_base(case):
    model, x, targets, layout = CASES[case]
    base, adapted = _setup(model, x, targets, layout)
    np.testing.assert_array_equal(
        lj.apply(model.apply)({"params": adapted}, x), model.apply({"params": base}, x)
    )


@pytest.mark.parametrize("case", CASES)
def test_factored_equals_materialize_equals_merge(case):
    model, x, targets, layout = CASES[case]
    base, adapted = _setup(model, x, targets, layout)
    adapted = perturb_factors(adapted, jax.random.key(7))
    factored = lj.apply(model.apply)({"params": adapted}, x)
    materialized = model.apply({"params": lj.materialize(adapted)}, x)
    merged = model.apply({"params": lj.merge(adapted)}, x)
    base_out = model.apply({"params": base}, x)
    # float32 paths that differ in rounding only: within chain_atol of each other.
    atol = tol.chain_atol(DEPTHS[case], tol.scale_of(factored))
    assert not tol.close(base_out, factored, atol)  # the adapter does something, beyond rounding
    tol.assert_close(materialized, factored, atol)
    tol.assert_close(merged, factored, atol)


def test_bias_deltas_take_effect_in_every_path():
    model, x = MLP(), jnp.linspace(-1, 1, 3 * 24).reshape(3, 24)
    _, adapted = _setup(model, x, r"fc1/kernel", bias="all")
    adapted = perturb_factors(adapted, jax.random.key(3))
    factored = lj.apply(model.apply)({"params": adapted}, x)
    atol = tol.chain_atol(DEPTHS["mlp"], tol.scale_of(factored))
    tol.assert_close(model.apply({"params": lj.merge(adapted)}, x), factored, atol)
    # Second code path, by hand: fc2(gelu(x(W1 + sA1B1) + b1 + d1)) + b2 + d2.
    p = adapted
    w1 = (
        p["fc1"]["kernel"]
        + p["fc1"]["kernel_lora_scale"] * p["fc1"]["kernel_lora_a"] @ p["fc1"]["kernel_lora_b"]
    )
    h = nn.gelu(x @ w1 + p["fc1"]["bias"] + p["fc1"]["bias_lora_delta"])
    by_hand = h @ p["fc2"]["kernel"] + p["fc2"]["bias"] + p["fc2"]["bias_lora_delta"]
    tol.assert_close(by_hand, factored, atol)


def test_bfloat16_merged_matches_unmerged():
    model = MLP(hidden=64, features=32)
    x = jnp.linspace(-1, 1, 4 * 32).reshape(4, 32).astype(jnp.bfloat16)
    variables = init_variables(model, x)
    base = jax.tree.map(lambda w: w.astype(jnp.bfloat16), variables["params"])
    adapted = perturb_factors(
        lj.init(jax.random.key(1), base, lj.LoraConfig(4, 8, ".*kernel")),
        jax.random.key(2),
        scale=0.1,
    )
    merged = lj.merge(adapted)
    assert all(w.dtype == jnp.bfloat16 for w in jax.tree.leaves(merged))
    factored = lj.apply(model.apply)({"params": adapted}, x).astype(jnp.float32)
    # bfloat16 rounds each op's output (dots accumulate in float32): per layer the dot, the
    # adapter's x·A, ·s, ·B and sum (merged: s·A·B, W + ΔW), the bias add and the activation.
    atol = tol.chain_atol(2 * (6 + E), tol.scale_of(factored), jnp.bfloat16)
    tol.assert_close(model.apply({"params": merged}, x).astype(jnp.float32), factored, atol)


def _loss_fns(model, x):
    def loss(params):
        return jnp.mean(jnp.square(lj.apply(model.apply)({"params": params}, x)))

    return loss


GRAD_X = (jnp.arange(14).reshape(2, 7) * 5) % 56
# The gradient's chain: ScannedLM's forward, its backward, and the sum over the 14 tokens.
GRAD_DEPTH = tol.grad_depth(SCANNED_LM, tokens=GRAD_X.size)


def _gradients(bug=lambda frozen, t: (frozen, t)):
    """(trainable, its factored gradients, its gradients through materialize of
    `bug(frozen, trainable)`)."""
    model, x = ScannedLM(), GRAD_X
    _, adapted = _setup(model, x, r"layers/(q_proj|v_proj)/kernel|embed_tokens/embedding")
    frozen, trainable = lj.split(perturb_factors(adapted, jax.random.key(4)))
    loss = _loss_fns(model, x)
    grads = jax.grad(lambda t: loss(lj.combine(frozen, t)))(trainable)
    via_materialize = jax.grad(
        lambda t: jnp.mean(
            jnp.square(model.apply({"params": lj.materialize(lj.combine(*bug(frozen, t)))}, x))
        )
    )(trainable)
    return trainable, grads, via_materialize


def _gradient_atol(g):
    return tol.chain_atol(GRAD_DEPTH, tol.scale_of(g))


def test_gradients_reach_every_factor_and_only_factors():
    trainable, grads, via_materialize = _gradients()
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(grads)]
    assert all("_lora_a" in n or "_lora_b" in n for n in names)
    for name, g in zip(names, jax.tree.leaves(grads)):
        assert float(jnp.abs(g).max()) > 0, f"zero gradient for {name}"
    # A second code path: gradients through materialize agree, leaf by leaf, to within the
    # chain's rounding at that leaf's scale.
    tol.tree_assert_close(via_materialize, grads, _gradient_atol)


def _scaled(frozen, t, factor=1.01):
    return jax.tree_util.tree_map_with_path(
        lambda p, w: w * factor if "_lora_scale" in jax.tree_util.keystr(p) else w, frozen
    ), t


def _first_layer_everywhere(frozen, t):
    q = t["layers"]["q_proj"]
    first = {k: jnp.broadcast_to(v[:1], v.shape) for k, v in q.items()}
    return frozen, {**t, "layers": {**t["layers"], "q_proj": first}}


@pytest.mark.parametrize(
    "bug",
    [_scaled, _first_layer_everywhere],
    ids=["scale off by 1%", "layer 0's q factors in every layer"],
)
def test_the_gradient_tolerance_fails_for_a_planted_bug(bug):
    _, grads, buggy = _gradients(bug)
    assert not tol.tree_close(buggy, grads, _gradient_atol)


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
    atol = tol.chain_atol(DEPTHS["mlp"], tol.scale_of(deterministic))
    assert not tol.close(drop1, deterministic, atol) and not tol.close(drop1, drop2, atol)
    # Only the adapter's input is dropped: with B = 0 the output is the base's, exactly (the
    # adapter adds x·A·0 = 0, as in test_adapted_model_starts_equal_to_base).
    _, fresh = _setup(model, x, r".*/kernel")
    np.testing.assert_array_equal(
        apply({"params": fresh}, x, rngs={"dropout": jax.random.key(1)}),
        model.apply({"params": base}, x),
    )


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
    factored = _dot_output_shapes(
        jax.make_jaxpr(lambda *a: step(*a, loss))(frozen, trainable, tx.init(trainable)).jaxpr
    )
    assert factored and not [s for s in factored if s[-2:] in weight_shapes]
    # The check can fail: the materialize path does form ΔW = A·B.
    dense = lambda p: jnp.mean(jnp.square(model.apply({"params": lj.materialize(p)}, x)))
    materialized = _dot_output_shapes(
        jax.make_jaxpr(lambda *a: step(*a, dense))(frozen, trainable, tx.init(trainable)).jaxpr
    )
    assert [s for s in materialized if s[-2:] in weight_shapes]
