"""Adapter banks (lj.stack, unstack, put, apply with adapter_ids, merge(adapter_id=)) and
adapter arithmetic (lj.weighted_sum, lj.compress)."""

import functools
import itertools
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import models

import tolerances as tol
from flax_fixtures import Attention, init_variables

E = tol.ELEMENTWISE


class ScannedAttention(nn.Module):
    """`layers` residual nn.DenseGeneral attention blocks under nn.scan: kernels
    (layers, D, N, H) and (layers, N, H, D)."""

    layers: int = 2

    @nn.compact
    def __call__(self, x_BxLxD):
        block = nn.scan(
            _Residual, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers
        )
        return block(name="blocks")(x_BxLxD, None)[0]


class _Residual(nn.Module):
    @nn.compact
    def __call__(self, x_BxLxD, _):
        return x_BxLxD + Attention(name="attn")(nn.LayerNorm(name="norm")(x_BxLxD)), None


# (rank, targets, alpha) of the adapters stacked in each bank: different ranks, scales and
# target sets (adapter 1 lacks some of adapter 0's targets and has others).
LLAMA_ADAPTERS = [
    (2, r".*/(q_proj|v_proj)/kernel", 4.0),
    (4, r".*/(v_proj|o_proj|up_proj)/kernel", 16.0),
    (3, r".*/(q_proj|down_proj)/kernel", 3.0),
]
ATTENTION_ADAPTERS = [
    (2, r".*/(q_proj|v_proj)/kernel", 4.0),
    (4, r".*/(v_proj|o_proj)/kernel", 16.0),
    (3, r".*/q_proj/kernel", 3.0),
]
MAX_RANK = 4
IDS = [2, -1, 0, 1, 0, -1]  # every slot, the base twice, a slot twice


def _random_like(shapes, rng, leaf_value):
    """A tree of `shapes` (from `jax.eval_shape`) filled eagerly by numpy: what
    `leaf_value(path string, shape, rng)` returns, in each leaf's dtype."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(
            leaf_value(jax.tree_util.keystr(path), leaf.shape, rng), leaf.dtype
        ),
        shapes,
    )


def _adapters(base, specs, seed, layout=None):
    """Adapters of `base` with random (non-zero) A and B, one per (rank, targets, alpha): the
    shapes of lj.init's (traced, not run), the values drawn by numpy (fast, eager)."""
    rng = np.random.default_rng(seed)
    out = []
    for r, targets, alpha in specs:
        config = lj.LoraConfig(r, alpha, targets)
        shapes = jax.eval_shape(lambda c=config: lj.adapter(lj.init(KEY, base, c, layout=layout)))
        out.append(
            _random_like(
                shapes,
                rng,
                lambda path, shape, rng, r=r, alpha=alpha: (
                    np.full(shape, alpha / r)
                    if "scale" in path
                    else 0.3 * rng.standard_normal(shape)
                ),
            )
        )
    return out


def base_params(cfg, seed=0):
    """Random params of a `models` decoder: models.init_params's shapes (traced, not run;
    compiling it takes seconds), norm scales 1 and weights N(0, 0.02²) drawn by numpy."""
    shapes = jax.eval_shape(lambda: models.init_params(cfg, KEY))
    return _random_like(
        shapes,
        np.random.default_rng(seed),
        lambda path, shape, rng: (
            np.ones(shape) if "norm" in path else 0.02 * rng.standard_normal(shape)
        ),
    )


KEY = jax.random.key(0)


class Case(NamedTuple):
    """A model, its base params, inputs, adapters of LLAMA_ADAPTERS or ATTENTION_ADAPTERS, the
    outputs' chain depth (tolerances), `run`: the jitted lj.apply(model.apply) of the bank,
    and `plain`: the jitted model.apply of the base and of each adapter merged (one program
    for all of them: each distinct tree would compile its own)."""

    model: nn.Module
    base: dict
    x: jax.Array
    adapters: list
    depth: int
    run: Callable
    plain: Callable

    def alone(self, adapter) -> jax.Array:
        """The outputs for `x` with `adapter` merged into the base (None: the base)."""
        params = self.base if adapter is None else lj.merge(lj.combine(self.base, adapter))
        return self.plain({"params": params}, self.x)


@functools.cache
def case(name: str) -> Case:
    """The case `name` of CASES, built once per session."""
    return CASES[name]()


def _llama(scan):
    cfg = models.with_options(models.get_config("tiny-llama"), scan_layers=scan)
    model = models.Decoder(cfg)
    base = base_params(cfg)
    x = jax.random.randint(jax.random.key(1), (len(IDS), 7), 0, cfg.vocab_size)
    # n: the decoder's logits chain (tolerances.config_depth) with R + 2 per adapted
    # projection: the bank's padded rank R, or the merged W + s·A·B's R-term sum, scale
    # product and addition (the references below are merged).
    depth = tol.config_depth(cfg, 7, MAX_RANK + 2)
    adapters = _adapters(base, LLAMA_ADAPTERS, 10)
    return Case(
        model, base, x, adapters, depth, jax.jit(lj.apply(model.apply)), jax.jit(model.apply)
    )


def _scanned_attention():
    model = ScannedAttention()
    x = jax.random.normal(jax.random.key(3), (len(IDS), 5, 24))  # tokens differ after a norm
    variables = init_variables(model, x)
    layout = lj.infer_layout(model.apply, variables, x)
    # n per block: LayerNorm (2·24), q/k/v projection (24) + R + 2 (the padded rank, or the
    # merged weight's R-term sum, scale product and addition), scores (6), softmax and
    # weighted sum (2·5), o_proj (24) + R + 2, residual and element-wise functions.
    depth = 2 * (2 * 24 + 24 + MAX_RANK + 2 + 6 + 2 * 5 + 24 + MAX_RANK + 2 + 6 * E)
    adapters = _adapters(variables["params"], ATTENTION_ADAPTERS, 20, layout)
    base = variables["params"]
    return Case(
        model, base, x, adapters, depth, jax.jit(lj.apply(model.apply)), jax.jit(model.apply)
    )


CASES = {
    "tiny_llama": lambda: _llama(scan=False),
    "tiny_llama_scanned": lambda: _llama(scan=True),
    "scanned_dense_general": _scanned_attention,
}


@pytest.mark.parametrize("name", CASES)
def test_each_row_of_a_mixed_batch_equals_its_own_adapter_alone(name):
    c = case(name)
    mixed = c.run(
        {"params": lj.combine(c.base, lj.stack(c.adapters))}, c.x, adapter_ids=jnp.array(IDS)
    )
    # Second code path: each adapter alone, merged into the base (its own rank, no padding,
    # no gather, no factored forward), and the base alone, through the unmodified model.
    alone = {i: c.alone(adapter) for i, adapter in enumerate(c.adapters)}
    alone[-1] = c.alone(None)
    expected = jnp.stack([alone[i][row] for row, i in enumerate(IDS)])
    atol = tol.chain_atol(c.depth, tol.scale_of(expected))
    tol.assert_close(mixed, expected, atol, name)
    # The adapters matter here: each row is far from the others' results.
    for row, i in enumerate(IDS):
        for j in {*IDS} - {i}:
            assert not tol.close(mixed[row], alone[j][row], atol)


def test_unstack_gives_each_adapter_back_exactly():
    adapters = case("tiny_llama_scanned").adapters
    bank = lj.stack(adapters)
    for i, adapter in enumerate(adapters):
        back = lj.flatten_paths(lj.unstack(bank, i))
        original = lj.flatten_paths(adapter)
        assert list(sorted(back)) == sorted(original)  # same leaves: the same targets
        for path, leaf in original.items():
            assert back[path].dtype == leaf.dtype and back[path].shape == leaf.shape, path
            np.testing.assert_array_equal(back[path], leaf, err_msg=path)


def test_merge_of_a_slot_equals_merging_that_adapter():
    c = case("tiny_llama_scanned")
    base, adapters = c.base, c.adapters
    params = lj.combine(base, lj.stack(adapters))
    for i, adapter in enumerate(adapters):
        merged = lj.merge(params, adapter_id=i)
        expected = lj.merge(lj.combine(base, adapter))
        assert jax.tree.structure(merged) == jax.tree.structure(base)

        # W + s·A·B sums over R terms (the padded rank; the padding adds exact zeros) and
        # rounds the scale product and the addition: γ_{R+2}·(|W| + s·|A|@|B|), two sides.
        def atol(path, w, adapted=lj.flatten_paths(lj.combine(base, adapter))):
            if path + "_lora_a" not in adapted:
                return 0.0  # untouched weights (and those adapter i lacks) stay exact
            a, b = adapted[path + "_lora_a"], adapted[path + "_lora_b"]
            s = adapted[path + "_lora_scale"][:, None, None]
            terms = np.abs(w) + np.abs(s) * np.abs(np.asarray(a)) @ np.abs(np.asarray(b))
            return tol.dot_error(terms, MAX_RANK + 2, sides=2)

        flat_merged, flat_expected = lj.flatten_paths(merged), lj.flatten_paths(expected)
        for path, w in lj.flatten_paths(base).items():
            tol.assert_close(flat_merged[path], flat_expected[path], atol(path, w), path)


def test_a_merged_slot_is_its_closed_form():
    """merge(adapter_id=i) against s_i·A_i·B_i in float64 from the adapter's own factors."""
    c = case("tiny_llama_scanned")
    base, adapters = c.base, c.adapters
    merged = lj.merge(lj.combine(base, lj.stack(adapters)), adapter_id=1)
    path = "layers/mlp/up_proj/kernel"
    flat = lj.flatten_paths(adapters[1])
    a, b = (np.asarray(flat[path + s], np.float64) for s in ("_lora_a", "_lora_b"))
    s = np.asarray(flat[path + "_lora_scale"], np.float64)[:, None, None]
    w = np.asarray(lj.flatten_paths(base)[path], np.float64)
    expected = w + s * a @ b
    # float32: a rank-4 sum, the scale product and the addition, one side (float64 exact).
    atol = tol.dot_error(np.abs(w) + np.abs(s) * np.abs(a) @ np.abs(b), MAX_RANK + 2)
    tol.assert_close(lj.flatten_paths(merged)[path], expected, atol, path)


def test_hot_swaps_do_not_recompile_and_take_effect():
    c = case("tiny_llama_scanned")
    base, bank, ids = c.base, lj.stack(c.adapters), jnp.array(IDS)
    before = c.run({"params": lj.combine(base, bank)}, c.x, adapter_ids=ids)
    compiled = c.run._cache_size()
    # Adapters of ranks 1..3 (every target's bank rank is 3 or 4), one per slot's targets.
    incoming = [
        _adapters(base, [(1 + j, targets, alpha)], 1000 + j)[0]
        for j, (_, targets, alpha) in enumerate(LLAMA_ADAPTERS)
    ]
    for swap in range(100):
        bank = lj.put(bank, swap % 3, incoming[swap % 3])
        logits = c.run({"params": lj.combine(base, bank)}, c.x, adapter_ids=ids)
    assert c.run._cache_size() == compiled
    # The last swap wrote slot 99 % 3 = 0: its rows now run incoming[0], not adapter 0.
    alone = c.alone(incoming[0])
    rows = [row for row, i in enumerate(IDS) if i == 0]
    atol = tol.chain_atol(c.depth, tol.scale_of(alone[rows, :]))
    tol.assert_close(logits[rows, :], alone[rows, :], atol)
    assert not tol.close(logits[rows, :], before[rows, :], atol)


def test_weighted_sum_is_the_sum_of_the_deltas():
    c = case("tiny_llama")
    base, adapters = c.base, c.adapters
    weights = [0.5, -2.0, 1.5]
    zero = jax.tree.map(jnp.zeros_like, base)  # merging onto zeros gives ΔW itself
    got = lj.flatten_paths(lj.merge(lj.combine(zero, lj.weighted_sum(adapters, weights))))
    flats = [lj.flatten_paths(a) for a in adapters]
    for path in got:
        # Σ w_i·s_i·A_i·B_i in float64 (exact by comparison); zero where no adapter targets.
        expected, terms = np.zeros(got[path].shape), np.zeros(got[path].shape)
        for w, flat in zip(weights, flats):
            if path + "_lora_a" in flat:
                a, b, s = (np.asarray(flat[path + x], np.float64) for x in LORA_LEAVES)
                expected = expected + w * s * a @ b
                terms = terms + abs(w * s) * np.abs(a) @ np.abs(b)
        # float32: w·s·B rounded (2 products), the rank-9 sum, the merge's scale product and
        # addition onto zero (2): γ_13 of the terms' magnitudes, one side.
        tol.assert_close(got[path], expected, tol.dot_error(terms, 2 + 9 + 2), path)


LORA_LEAVES = ("_lora_a", "_lora_b", "_lora_scale")


def _orthonormal(key, n, k):
    return np.linalg.qr(np.asarray(jax.random.normal(key, (n, k)), np.float64))[0]


@pytest.mark.parametrize("keep", [1, 3])
def test_compress_is_the_optimal_truncation(keep):
    """On ΔW = U·diag(σ)·Vᵀ with σ we choose (two stacked layers, each its own σ): the
    reported error is sqrt(Σ dropped σ²), the result is that far from ΔW, and no rank-k
    competitor (other singular triplets, random matrices, perturbations) is closer."""
    fan_in, fan_out = 12, 10
    sigmas = np.array([[5.0, 3.0, 2.0, 1.0, 0.5], [4.0, 4.0 * 0.9, 1.0, 0.3, 0.1]])
    rank = sigmas.shape[1]
    keys = jax.random.split(jax.random.key(7), 4)
    u = np.stack([_orthonormal(keys[i], fan_in, rank) for i in range(2)])
    v = np.stack([_orthonormal(keys[2 + i], fan_out, rank) for i in range(2)])
    scale = np.array([2.0, 0.5])  # the scale must be folded in: A carries σ / s
    a = u * (sigmas / scale[:, None])[:, None, :]
    delta = np.einsum("sir,sor->sio", u * sigmas[:, None, :], v)
    adapter = {
        "layers": {
            "w_lora_a": jnp.asarray(a, jnp.float32),
            "w_lora_b": jnp.asarray(np.swapaxes(v, 1, 2), jnp.float32),
            "w_lora_scale": jnp.asarray(scale, jnp.float32),
        }
    }
    small, errors = lj.compress(adapter, keep)
    got = small["layers"]
    assert got["w_lora_a"].shape == (2, fan_in, keep) and got["w_lora_b"].shape == (
        2,
        keep,
        fan_out,
    )
    approx = np.einsum(
        "sir,sro->sio",
        np.asarray(got["w_lora_a"], np.float64) * np.asarray(got["w_lora_scale"])[:, None, None],
        np.asarray(got["w_lora_b"], np.float64),
    )
    optimal = np.sqrt(np.sum(sigmas[:, keep:] ** 2, axis=1))
    # float32 QR (reductions over fan_in and fan_out), the r×r core and its SVD (r sweeps of
    # r), the products back (r): γ_n·σ_max with n = fan_in + fan_out + r² + 3r, one side.
    atol = tol.chain_atol(fan_in + fan_out + rank**2 + 3 * rank, sigmas.max(), sides=1)
    tol.assert_close(errors["layers/w"], optimal, atol, "reported error")
    achieved = np.linalg.norm(delta - approx, axis=(1, 2))
    tol.assert_close(achieved, optimal, atol, "achieved error")
    rng = np.random.default_rng(0)
    for layer in range(2):
        competitors = [
            np.einsum(
                "ir,or->io", u[layer][:, list(c)] * sigmas[layer, list(c)], v[layer][:, list(c)]
            )
            for c in itertools.combinations(range(rank), keep)
        ]
        competitors += [
            rng.normal(size=(fan_in, keep)) @ rng.normal(size=(keep, fan_out)) for _ in range(20)
        ]
        # Near the optimum: its own factors, perturbed (still rank k).
        left, right = approx[layer] @ v[layer][:, :keep], v[layer][:, :keep].T
        competitors += [
            (left + 1e-2 * rng.normal(size=left.shape))
            @ (right + 1e-2 * rng.normal(size=right.shape))
            for _ in range(20)
        ]
        for competitor in competitors:
            assert np.linalg.matrix_rank(competitor) <= keep
            assert np.linalg.norm(delta[layer] - competitor) >= optimal[layer] - atol


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b, a: lj.put(b, 0, a["wide"]), "do not fit the bank's slots"),
        (lambda b, a: lj.put(b, 5, a["one"]), "not a slot of this bank of 2"),
        (lambda b, a: lj.put(b, 0, a["other_target"]), "has no slot for"),
        (lambda b, a: lj.stack([a["one"], a["delta"]]), "bias delta"),
        (lambda b, a: lj.stack([a["one"], a["dora"]]), "DoRA adapter"),
        (lambda b, a: lj.merge(lj.combine(a["base"], b)), "pick one with"),
        (lambda b, a: lj.weighted_sum([a["one"]], [1.0, 2.0]), "one weight per adapter"),
    ],
)
def test_bad_bank_input_is_one_clear_error(call, message):
    base = {
        "d": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
        "e": {"kernel": jnp.ones((3, 3))},
    }
    make = lambda rank, targets, **kw: lj.adapter(
        lj.init(jax.random.key(0), base, lj.LoraConfig(rank, 4, targets, **kw))
    )
    adapters = {
        "base": base,
        "one": make(1, "d/kernel"),
        "wide": make(3, "d/kernel"),
        "other_target": make(1, "e/kernel"),
        "delta": make(1, "d/kernel", bias="all"),
        "dora": make(1, "d/kernel", use_dora=True),
    }
    bank = lj.stack([adapters["one"], make(2, "d/kernel")])
    with pytest.raises(ValueError, match=message):
        call(bank, adapters)


def test_a_bank_without_adapter_ids_is_refused():
    model = nn.Dense(3)
    x = jnp.ones((2, 4))
    base = model.init(jax.random.key(0), x)["params"]
    bank = lj.stack([lj.adapter(lj.init(jax.random.key(1), base, lj.LoraConfig(2, 4, "kernel")))])
    with pytest.raises(ValueError, match="adapter_ids"):
        lj.apply(model.apply)({"params": lj.combine(base, bank)}, x)
    with pytest.raises(ValueError, match="one id per example"):
        lj.apply(model.apply)({"params": lj.combine(base, bank)}, x, adapter_ids=jnp.zeros(3, int))
