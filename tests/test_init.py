"""lj.init: factor shapes, closed-form counts, initial values, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

import tolerances as tol
from flax_fixtures import MLP, Attention, ScannedLM, init_variables

X_MLP = jnp.ones((2, 24))


def _mlp_params():
    return init_variables(MLP(), X_MLP)["params"]


def _count(tree, pred):
    return sum(
        x.size
        for k, x in jax.tree_util.tree_leaves_with_path(tree)
        if pred(jax.tree_util.keystr(k))
    )


def _trainable(tree):
    return _count(tree, lambda k: any(s in k for s in ("_lora_a", "_lora_b", "_lora_delta")))


def test_factor_shapes_and_values_follow_the_paper():
    params = _mlp_params()
    adapted = lj.init(
        jax.random.key(1), params, lj.LoraConfig(rank=4, alpha=16, targets=r"fc1/kernel")
    )
    fc1 = adapted["fc1"]
    assert fc1["kernel_lora_a"].shape == (24, 4) and fc1["kernel_lora_b"].shape == (4, 40)
    assert not np.any(fc1["kernel_lora_b"]) and np.all(np.abs(fc1["kernel_lora_a"]) > 0)
    assert float(fc1["kernel_lora_scale"]) == 16 / 4
    assert fc1["kernel"] is params["fc1"]["kernel"] and fc1["bias"] is params["fc1"]["bias"]
    assert set(adapted["fc2"]) == {"kernel", "bias"}


def test_gaussian_and_kaiming_init_statistics():
    params = {"big": {"kernel": jnp.zeros((4096, 512))}}
    g = lj.init(jax.random.key(0), params, lj.LoraConfig(8, 8, "big/kernel"))["big"][
        "kernel_lora_a"
    ]
    assert abs(float(g.std()) - 1 / 8) < 0.01  # PEFT "gaussian": std 1/r
    k = lj.init(
        jax.random.key(0), params, lj.LoraConfig(8, 8, "big/kernel", init="kaiming_uniform")
    )
    a = k["big"]["kernel_lora_a"]
    bound = 1 / math.sqrt(4096)  # kaiming_uniform(a=sqrt(5)) on fan_in
    assert float(jnp.abs(a).max()) <= bound and float(jnp.abs(a).max()) > 0.99 * bound


def test_embedding_swaps_the_zero_factor_like_peft():
    params = init_variables(ScannedLM(), jnp.zeros((1, 4), jnp.int32))["params"]
    adapted = lj.init(jax.random.key(1), params, lj.LoraConfig(4, 8, "embed_tokens/embedding"))
    e = adapted["embed_tokens"]
    assert e["embedding_lora_a"].shape == (56, 4) and e["embedding_lora_b"].shape == (4, 24)
    assert not np.any(e["embedding_lora_a"]) and np.any(e["embedding_lora_b"])


@pytest.mark.parametrize("rank", [1, 2, 8])
def test_trainable_count_is_the_closed_form(rank):
    params = init_variables(ScannedLM(), jnp.zeros((1, 4), jnp.int32))["params"]
    cfg = lj.LoraConfig(rank, 2 * rank, r"layers/(q_proj|v_proj|up_proj|down_proj)/kernel")
    adapted = lj.init(jax.random.key(1), params, cfg)
    layers, d, f = 3, 24, 40
    # r·(fan_in + fan_out) per target, per layer.
    expected = layers * rank * ((d + d) * 2 + (d + f) + (f + d))
    assert _trainable(adapted) == expected
    assert f"{expected:,}" in lj.summary(adapted)


@pytest.mark.parametrize("mode", ["none", "all", "lora_only"])
def test_bias_modes_count_like_loralib(mode):
    params = _mlp_params()
    adapted = lj.init(jax.random.key(1), params, lj.LoraConfig(2, 4, r"fc1/kernel", bias=mode))
    lora = 2 * (24 + 40)
    extra = {"none": 0, "all": 40 + 24, "lora_only": 40}[mode]
    assert _trainable(adapted) == lora + extra


def test_scanned_factors_are_stacked_and_the_base_is_not_copied():
    params = init_variables(ScannedLM(), jnp.zeros((1, 4), jnp.int32))["params"]
    adapted = lj.init(jax.random.key(1), params, lj.LoraConfig(4, 8, r"layers/q_proj/kernel"))
    q = adapted["layers"]["q_proj"]
    assert q["kernel_lora_a"].shape == (3, 24, 4) and q["kernel_lora_b"].shape == (3, 4, 24)
    assert q["kernel_lora_scale"].shape == (3,)
    base_leaves = jax.tree_util.tree_leaves_with_path(params)
    flat_adapted = dict(jax.tree_util.tree_leaves_with_path(adapted))
    assert all(flat_adapted[k] is leaf for k, leaf in base_leaves)
    # The A of each layer is drawn independently.
    assert not np.allclose(q["kernel_lora_a"][0], q["kernel_lora_a"][1])


def test_default_layout_reads_dense_general_from_its_bias():
    model, x = Attention(), jnp.ones((2, 5, 24))
    params = init_variables(model, x)["params"]
    adapted = lj.init(jax.random.key(1), params, lj.LoraConfig(4, 8, r"(q_proj|o_proj)/kernel"))
    assert adapted["q_proj"]["kernel_lora_a"].shape == (24, 4)  # bias (heads, head_dim): 1 in axis
    assert adapted["o_proj"]["kernel_lora_a"].shape == (4, 6, 4)  # bias (embed,): 2 in axes


def test_layout_from_the_model_for_dense_general():
    model, x = Attention(), jnp.ones((2, 5, 24))
    variables = init_variables(model, x)
    layout = lj.infer_layout(model.apply, variables, x)
    assert layout["q_proj/kernel"] == lj.Layout(stack=0, fan_in=1)
    assert layout["o_proj/kernel"] == lj.Layout(stack=0, fan_in=2)
    adapted = lj.init(
        jax.random.key(1),
        variables["params"],
        lj.LoraConfig(4, 8, r"(q_proj|o_proj)/kernel"),
        layout=layout,
    )
    assert adapted["q_proj"]["kernel_lora_a"].shape == (24, 4)
    assert adapted["q_proj"]["kernel_lora_b"].shape == (4, 4, 6)
    assert adapted["o_proj"]["kernel_lora_a"].shape == (4, 6, 4)
    assert adapted["o_proj"]["kernel_lora_b"].shape == (4, 24)
    # closed form with fan_in, fan_out the products of the input and output axes
    assert _trainable(adapted) == 4 * (24 + 24) * 2


def test_rank_and_alpha_patterns():
    params = _mlp_params()
    cfg = lj.LoraConfig(
        4, 8, r".*/kernel", rank_pattern={"fc2": 2}, alpha_pattern={"fc2": 10}, use_rslora=True
    )
    adapted = lj.init(jax.random.key(1), params, cfg)
    assert adapted["fc1"]["kernel_lora_a"].shape[-1] == 4
    assert adapted["fc2"]["kernel_lora_a"].shape[-1] == 2
    # alpha/√r in Python, then rounded once to float32: within γ_1 (tests/tolerances.py).
    np.testing.assert_allclose(
        adapted["fc1"]["kernel_lora_scale"], 8 / math.sqrt(4), rtol=tol.gamma(1)
    )
    np.testing.assert_allclose(
        adapted["fc2"]["kernel_lora_scale"], 10 / math.sqrt(2), rtol=tol.gamma(1)
    )


def test_bfloat16_weights_get_float32_factors():
    params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), _mlp_params())
    adapted = lj.init(jax.random.key(1), params, lj.LoraConfig(2, 4, r".*/kernel"))
    assert adapted["fc1"]["kernel"].dtype == jnp.bfloat16
    assert adapted["fc1"]["kernel_lora_a"].dtype == jnp.float32


def test_targets_matching_nothing_lists_the_available_paths():
    with pytest.raises(ValueError, match=r"matches no weight.*fc1/kernel.*fc2/kernel"):
        lj.init(jax.random.key(0), _mlp_params(), lj.LoraConfig(4, 8, r".*/q_proj/kernel"))


def test_rank_larger_than_the_matrix_names_the_path():
    with pytest.raises(ValueError, match=r"fc1/kernel: rank 30 exceeds min\(fan_in, fan_out\)"):
        lj.init(jax.random.key(0), _mlp_params(), lj.LoraConfig(30, 8, r"fc1/kernel"))


def test_factors_do_not_depend_on_dict_order_or_on_the_other_targets():
    """A loader may build the same tree in another key order; adding a target keeps the rest."""
    key = jax.random.key(0)
    w = lambda seed: jax.random.normal(jax.random.key(seed), (8, 6))  # noqa: E731
    forward = {"q": {"kernel": w(1)}, "v": {"kernel": w(2)}, "o": {"kernel": w(3)}}
    backward = {name: forward[name] for name in reversed(list(forward))}
    config = lj.LoraConfig(2, 4, "(q|v)/kernel")
    a, b = lj.init(key, forward, config), lj.init(key, backward, config)
    for name in ("q", "v"):
        np.testing.assert_array_equal(a[name]["kernel_lora_a"], b[name]["kernel_lora_a"])
    assert not np.array_equal(a["q"]["kernel_lora_a"], a["v"]["kernel_lora_a"])
    more = lj.init(key, forward, lj.LoraConfig(2, 4, "(q|v|o)/kernel"))
    np.testing.assert_array_equal(more["v"]["kernel_lora_a"], a["v"]["kernel_lora_a"])


def test_init_twice_is_an_error():
    adapted = lj.init(jax.random.key(0), _mlp_params(), lj.LoraConfig(2, 4, r"fc1/kernel"))
    with pytest.raises(ValueError, match="already hold LoRA factors"):
        lj.init(jax.random.key(0), adapted, lj.LoraConfig(2, 4, r"fc2/kernel"))


def test_bad_layout_is_an_error():
    with pytest.raises(ValueError, match="does not fit a weight"):
        lj.init(
            jax.random.key(0),
            _mlp_params(),
            lj.LoraConfig(2, 4, r"fc1/kernel"),
            layout={"fc1/kernel": lj.Layout(stack=1, fan_in=1)},
        )
