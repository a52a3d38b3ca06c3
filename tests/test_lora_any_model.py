"""`lj.apply` on models no stock Linen layer computes: NNX modules, a Linen layer of the
user's own (``self.param`` + ``lax.dot_general``), a scanned and rematerialised stack of
them, a tied head ``h @ Eᵀ``. The oracle is the same function on W + s·A·B
(`lj.materialize` inside the step, `lj.merge` outside it): a second code path that forms
the merged weight, where the factored one never does.

Tolerances (tests/tolerances.py): the two paths differ only in where s·A·B is added, so
each output is within γ_n·scale of the exact value with n the reductions and roundings
on its longest path; each adapted matmul on it adds a rank-r reduction and two roundings
(the scale and the addition) to the base model's count.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import lora_jax as lj
from tests import tolerances as tol

RANK = 2


def _key(seed: int) -> jax.Array:
    """A key of XLA's RngBitGenerator: its programs compile in a fraction of threefry's."""
    return jax.random.key(seed, impl="rbg")


BATCH, LENGTH = 3, 5


def _nonzero_adapter(adapted, seed: int):
    """`adapted` with N(0, 0.1²) added to every factor and bias delta: the adapter matters
    (init leaves B = 0, or A = 0 for an embedding), and every factor gets a gradient.
    NumPy draws the noise: no PRNG program to compile."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in lj.flatten_paths(adapted).items():
        if path.endswith(("_lora_a", "_lora_b", "_lora_delta")):
            value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
            value = value + 0.1 * rng.standard_normal(value.shape).astype(value.dtype)
            leaf = leaf.replace(value) if isinstance(leaf, nnx.Variable) else value
        out[path] = leaf
    return lj.unflatten_paths(out, like=adapted)


def _adapter_depth(adapted_matmuls: int) -> int:
    """Roundings the adapters add on a path through `adapted_matmuls` adapted matmuls."""
    return adapted_matmuls * (RANK + 2)


# ---------------------------------------------------------------- a Linen layer of one's own

FAN_IN, FAN_OUT, OUT = 24, 40, 11  # distinct from each other and from BATCH, LENGTH, RANK


class Linear(nn.Module):
    """A dense layer of the user's own: `self.param` and `lax.dot_general`, no nn.Dense."""

    features: int

    @nn.compact
    def __call__(self, x_BxLxI):
        w_IxO = self.param(
            "kernel", nn.initializers.lecun_normal(), (x_BxLxI.shape[-1], self.features)
        )
        b_O = self.param("bias", nn.initializers.normal(0.1), (self.features,))
        return lax.dot_general(x_BxLxI, w_IxO, (((x_BxLxI.ndim - 1,), (0,)), ((), ()))) + b_O


class CustomMLP(nn.Module):
    """The custom layer (rewritten) feeding a stock nn.Dense (intercepted)."""

    @nn.compact
    def __call__(self, x_BxLxI):
        h_BxLxO = jax.nn.gelu(Linear(FAN_OUT, name="up")(x_BxLxI))
        return nn.Dense(OUT, name="head")(h_BxLxO)


CUSTOM_DEPTH = FAN_IN + FAN_OUT + 2 + tol.ELEMENTWISE + _adapter_depth(2)


class Layer(nn.Module):
    @nn.compact
    def __call__(self, h_BxLxI, _):
        u_BxLxO = jax.nn.gelu(Linear(FAN_OUT, name="up")(h_BxLxI))
        return h_BxLxI + Linear(FAN_IN, name="down")(u_BxLxO), None


LAYERS = 4


class ScannedMLP(nn.Module):
    """`nn.scan` over `nn.remat` layers of the custom Linear: kernels (LAYERS, in, out)."""

    @nn.compact
    def __call__(self, x_BxLxI):
        stack = nn.scan(
            nn.remat(Layer),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=LAYERS,
        )
        h_BxLxI, _ = stack(name="layers")(x_BxLxI, None)
        return h_BxLxI


# per layer: up (FAN_IN), gelu, down (FAN_OUT), bias and residual adds
SCANNED_DEPTH = LAYERS * (FAN_IN + FAN_OUT + tol.ELEMENTWISE + 3 + _adapter_depth(2))


@functools.cache
def _linen_case(model, depth):
    """(fn, base tree, adapted tree, args, forward depth, tokens), built in one compile."""

    @jax.jit
    def build():
        x = jax.random.normal(_key(0), (BATCH, LENGTH, FAN_IN))
        params = model.init(_key(1), x)["params"]
        config = lj.LoraConfig(RANK, 4, r".*kernel", bias="lora_only")
        adapted = lj.init(_key(2), params, config)
        return x, params, adapted

    x, params, adapted = build()
    adapted = _nonzero_adapter(adapted, 3)
    return model.apply, {"params": params}, {"params": adapted}, (x,), depth, BATCH * LENGTH


# ---------------------------------------------------------------- an NNX Llama-style decoder

VOCAB, DIM, HEADS, HEAD_DIM, MLP = 19, 16, 2, 8, 28


class NnxBlock(nnx.Module):
    """Embedding, one pre-norm attention + SwiGLU block, the tied head h @ Eᵀ."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.attn_norm, self.mlp_norm = nnx.RMSNorm(DIM, rngs=rngs), nnx.RMSNorm(DIM, rngs=rngs)
        self.q = nnx.LinearGeneral(DIM, (HEADS, HEAD_DIM), use_bias=False, rngs=rngs)
        self.k = nnx.Linear(DIM, HEADS * HEAD_DIM, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(DIM, HEADS * HEAD_DIM, use_bias=False, rngs=rngs)
        self.o = nnx.LinearGeneral((HEADS, HEAD_DIM), DIM, axis=(-2, -1), use_bias=False, rngs=rngs)
        self.gate = nnx.Linear(DIM, MLP, rngs=rngs)
        self.up = nnx.Linear(DIM, MLP, rngs=rngs)
        self.down = nnx.Linear(MLP, DIM, rngs=rngs)
        self.final_norm = nnx.RMSNorm(DIM, rngs=rngs)

    def __call__(self, ids_BxL):
        h_BxLxD = self.embed(ids_BxL)
        x_BxLxD = self.attn_norm(h_BxLxD)
        split = (*ids_BxL.shape, HEADS, HEAD_DIM)
        q, k, v = self.q(x_BxLxD), self.k(x_BxLxD).reshape(split), self.v(x_BxLxD).reshape(split)
        scores_BxHxLxL = jnp.einsum("bqhd,bkhd->bhqk", q, k) / HEAD_DIM**0.5
        causal = jnp.tril(jnp.ones((ids_BxL.shape[1],) * 2, bool))
        weights = jax.nn.softmax(jnp.where(causal, scores_BxHxLxL, -1e9), axis=-1)
        h_BxLxD = h_BxLxD + self.o(jnp.einsum("bhqk,bkhd->bqhd", weights, v))
        x_BxLxD = self.mlp_norm(h_BxLxD)
        h_BxLxD = h_BxLxD + self.down(jax.nn.silu(self.gate(x_BxLxD)) * self.up(x_BxLxD))
        return self.final_norm(h_BxLxD) @ self.embed.embedding[...].T


NNX_DEPTH = tol.decoder_depth(
    layers=1, hidden=DIM, mlp=MLP, head_dim=HEAD_DIM, keys=LENGTH
) + _adapter_depth(6)  # embedding, q/k/v, o, gate/up, down, head on the longest path


@functools.cache
def _nnx_case():
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: NnxBlock(nnx.Rngs(_key(0)))))

    @jax.jit
    def build():
        _, state = nnx.split(NnxBlock(nnx.Rngs(_key(0))))
        # o contracts (heads, head_dim): two input axes
        config = lj.LoraConfig(RANK, 4, r".*(kernel|embedding)", bias="lora_only")
        layout = {r"o/kernel": lj.Layout(0, 2)}
        adapted = lj.init(_key(2), state, config, layout=layout)
        ids = jax.random.randint(_key(0), (BATCH, LENGTH), 0, VOCAB)
        return state, adapted, ids

    state, adapted, ids = build()
    adapted = _nonzero_adapter(adapted, 3)

    def fn(state, ids_BxL):
        return nnx.merge(graphdef, state)(ids_BxL)

    return fn, state, adapted, (ids,), NNX_DEPTH, BATCH * LENGTH


CASES = {  # each built once for the module's tests
    "custom_linen": lambda: _linen_case(CustomMLP(), CUSTOM_DEPTH),
    "scanned_remat_linen": lambda: _linen_case(ScannedMLP(), SCANNED_DEPTH),
    "nnx_llama_block": _nnx_case,
}


def _cotangent(out):
    """A fixed, non-uniform weighting of the output: the loss is Σ out·cot."""
    return jnp.cos(jnp.arange(out.size).reshape(out.shape))


def _loss(fn, params, args):
    out = fn(params, *args)
    return jnp.sum(out * _cotangent(out))


@functools.cache
def _outputs_and_gradients(name):
    """The output and the trainable half's gradient of Σ out·cot, factored and through
    `lj.materialize` (one compile each), and the outputs on the merged and base trees."""
    fn, base, adapted, args, _, _ = CASES[name]()
    frozen, trainable = lj.split(adapted)

    def with_gradient(forward):
        def run(t):
            out, pullback = jax.vjp(lambda t: forward(lj.combine(frozen, t), *args), t)
            return out, pullback(_cotangent(out))[0]

        return jax.jit(run)(trainable)

    factored = with_gradient(lj.apply(fn))
    materialized = with_gradient(lambda p, *a: fn(lj.materialize(p), *a))
    plain = jax.jit(fn)  # the base tree and the merged one share a structure
    return factored, materialized, plain(lj.merge(adapted), *args), plain(base, *args)


@pytest.mark.parametrize("name", CASES)
def test_factored_equals_materialized_and_merged(name):
    _, _, _, _, depth, _ = CASES[name]()
    (factored, _), (materialized, _), merged, base = _outputs_and_gradients(name)
    atol = tol.chain_atol(depth, tol.scale_of(materialized))
    tol.assert_close(factored, materialized, atol, "factored vs materialize")
    tol.assert_close(factored, merged, atol, "factored vs merged")
    # The adapter moves the output far beyond the bound: comparing with B = 0 would fail.
    assert not tol.close(factored, base, 100 * atol)


@pytest.mark.parametrize("name", CASES)
def test_gradients_reach_the_factors_as_through_the_merged_weight(name):
    _, _, _, _, depth, tokens = CASES[name]()
    (_, got), (_, want), _, _ = _outputs_and_gradients(name)
    n = tol.grad_depth(depth, tokens)
    tol.tree_assert_close(got, want, lambda e: tol.chain_atol(n, tol.scale_of(e)), name)
    # The trainable half is the factors and deltas alone, and each gets a gradient.
    for path, g in lj.flatten_paths(got).items():
        assert path.endswith(("_lora_a", "_lora_b", "_lora_delta")), path
        assert float(jnp.max(jnp.abs(jnp.asarray(g)))) > 0, f"{path} gets no gradient"


def _formed_shapes(jaxpr):
    """The shape of every array an equation forms, in nested jaxprs too."""
    for eqn in jaxpr.eqns:
        yield from (tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    for sub in jex.subjaxprs(jaxpr):
        yield from _formed_shapes(getattr(sub, "jaxpr", sub))


def _fan_in_by_fan_out(shape):
    return FAN_IN in shape and FAN_OUT in shape


@pytest.mark.parametrize("name", ["custom_linen", "scanned_remat_linen"])
def test_the_train_step_forms_no_fan_in_by_fan_out_array(name):
    fn, _, adapted, args, _, _ = CASES[name]()
    frozen, trainable = lj.split(adapted)

    def step_jaxpr(forward):
        grad = jax.grad(lambda t: _loss(forward, lj.combine(frozen, t), args))
        return jax.make_jaxpr(grad)(trainable).jaxpr

    factored = [s for s in _formed_shapes(step_jaxpr(lj.apply(fn))) if _fan_in_by_fan_out(s)]
    assert factored == []
    # The check can fail: the materialize path forms W + sAB and its gradient.
    merged = step_jaxpr(lambda p, *a: fn(lj.materialize(p), *a))
    assert any(_fan_in_by_fan_out(s) for s in _formed_shapes(merged))


def test_nnx_trains_with_the_readme_recipe():
    """split → grad w.r.t. the trainable state through lj.apply → lj.optimizer updates."""
    fn, _, adapted, args, _, _ = _nnx_case()
    frozen, trainable = lj.split(adapted)
    tx = lj.optimizer(optax.sgd(1e-3), trainable)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(
            lambda t: _loss(lj.apply(fn), lj.combine(frozen, t), args)
        )(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(3):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    assert losses[0] > losses[1] > losses[2]  # small steps down the gradient
    moved = lj.combine(frozen, trainable)
    assert jax.tree.structure(moved) == jax.tree.structure(adapted)


class Tanh(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 6))
        return x @ jnp.tanh(w)


class Squashed(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Tanh(name="squash")(x)


def test_a_weight_fed_to_an_elementwise_op_is_a_clear_error():
    x = jnp.ones((2, 4))
    model = Squashed()
    params = model.init(_key(0), x)["params"]
    adapted = lj.init(_key(1), params, lj.LoraConfig(RANK, 4, r".*kernel"))
    with pytest.raises(ValueError, match=r"params/squash/kernel reaches `tanh`"):
        lj.apply(model.apply)({"params": adapted}, x)


def test_a_reshape_mixing_input_and_output_axes_is_a_clear_error():
    adapted = lj.init(_key(1), {"w": jnp.ones((4, 6))}, lj.LoraConfig(RANK, 4, r"w"))
    with pytest.raises(ValueError, match=r"w reaches `reshape`"):
        lj.apply(lambda p, x: x @ p["w"].reshape(6, 4))(adapted, jnp.ones((2, 6)))


# ---------------------------------------------------------------- views and control flow


def _custom_vjp_matmul():
    @jax.custom_vjp
    def matmul(x, w):
        return x @ w

    matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))
    return matmul


def _while_over_layers(p, x):
    def body(carry):
        i, h = carry
        return i + 1, jnp.tanh(h @ p["ws"][i])

    return lax.while_loop(lambda c: c[0] < LAYERS, body, (0, x))[1]


# Each reads the adapted weights of `_VIEW_TREE` through views and control flow; x (2, 6).
VIEWS = {
    "weight_on_the_left": lambda p, x: jnp.einsum("io,bi->ob", p["w"], x),
    "bfloat16_and_split_outputs": lambda p, x: jnp.einsum(
        "bi,ihd->bhd", x.astype(jnp.bfloat16), p["w"].astype(jnp.bfloat16).reshape(6, 2, 4)
    ),
    "fused_projection_sliced": lambda p, x: jnp.prod(
        jnp.stack([x @ part for part in jnp.split(p["qkv"], 3, axis=1)]), axis=0
    ),
    "tied_head_transposed": lambda p, x: (x @ p["w"]) @ p["w"].T,
    "layer_index_in_fori_loop": lambda p, x: lax.fori_loop(
        0, LAYERS, lambda i, h: jnp.tanh(h @ p["ws"][i]), x
    ),
    "layer_index_in_while_loop": _while_over_layers,
    "layers_taken": lambda p, x: jnp.einsum(
        "bi,lio->lbo", x, jnp.take(p["ws"], jnp.array([2, 0]), axis=0)
    ),
    "stacked_axis_as_batch": lambda p, x: jnp.einsum(
        "lbi,lio->lbo", jnp.stack([x] * LAYERS), p["ws"]
    ),
    "broadcast_to_a_batch": lambda p, x: jnp.einsum(
        "lbi,lio->lbo", jnp.stack([x] * LAYERS), jnp.broadcast_to(p["w"], (LAYERS, 6, 8))
    ),
    "cond": lambda p, x: lax.cond(jnp.sum(x) > 0, lambda: x @ p["w"], lambda: jnp.tanh(x @ p["w"])),
    "checkpoint": lambda p, x: jax.checkpoint(lambda x: jnp.tanh(x @ p["w"]))(x),
    "custom_vjp": lambda p, x: _custom_vjp_matmul()(x, p["w"]),
}


@jax.jit
def _view_trees():
    base = {
        "w": jax.random.normal(_key(0), (6, 8)),
        "qkv": jax.random.normal(_key(1), (6, 12)),
        "ws": jax.random.normal(_key(2), (LAYERS, 6, 6)) / 6**0.5,
    }
    config = lj.LoraConfig(RANK, 4, r"w|qkv|ws")
    return (
        base,
        lj.init(_key(3), base, config),
        jax.random.normal(_key(5), (2, 6)),
    )


def test_views_and_control_flow_match_the_merged_weight():
    base, adapted, x = _view_trees()
    adapted = _nonzero_adapter(adapted, 4)
    # Every view in one program per path: one compile each, not one per view.
    factored = jax.jit(lambda p, x: {n: lj.apply(f)(p, x) for n, f in VIEWS.items()})(adapted, x)
    plain = jax.jit(lambda p, x: {n: f(p, x) for n, f in VIEWS.items()})
    merged, unadapted = plain(lj.merge(adapted), x), plain(base, x)
    for name in VIEWS:
        # At most LAYERS matmuls of 8 or fewer terms, each adapted, a tanh and a product
        # each, in the output's dtype (bfloat16: both paths round W' and the products to it).
        depth = LAYERS * (8 + _adapter_depth(1) + tol.ELEMENTWISE + 1)
        atol = tol.chain_atol(depth, tol.scale_of(merged[name]), dtype=merged[name].dtype)
        tol.assert_close(factored[name], merged[name], atol, name)
        assert not tol.close(factored[name], unadapted[name], 1e-3), name


def test_a_tree_nested_by_the_caller_adapts_each_weight_once():
    """The stock nn.Dense (intercepted) and the custom Linear (rewritten) under a key of the
    caller's: neither adapter is lost nor added twice."""
    apply, _, adapted, args, depth, _ = CASES["custom_linen"]()

    def fn(tree, x):
        return apply({"params": tree["model"]}, x)

    factored = jax.jit(lj.apply(fn))({"model": adapted["params"]}, *args)
    merged = jax.jit(fn)({"model": lj.merge(adapted["params"])}, *args)
    tol.assert_close(factored, merged, tol.chain_atol(depth, tol.scale_of(merged)))
