"""The Houlsby bottleneck-adapter model option (`ModelConfig.bottleneck_adapter`), which exists
for benchmarks/latency.py: zero-initialised it is the base model; trained it is
x + adapter(attn(norm(x))), then + adapter(mlp(norm(.))) with adapter(h) = h + up(gelu(down(h)))."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from benchmarks.latency import graft
from models.decoder import DecoderLayer
from models.layers import MLP, Attention, norm, visibility

BOTTLENECK = 5


@pytest.mark.parametrize(("name", "scan_layers"), [("tiny-llama", True), ("tiny-gpt2", False)])
def test_zero_initialised_adapter_is_the_base_model(name, scan_layers):
    config = models.get_config(name, scan_layers=scan_layers)
    adapted_config = models.with_options(config, bottleneck_adapter=BOTTLENECK)
    base = models.init_params(config, jax.random.key(0))
    adapted = graft(base, models.init_params(adapted_config, jax.random.key(1)))
    ids = jax.random.randint(jax.random.key(2), (2, 7), 0, config.vocab_size)

    expected = models.Decoder(config).apply({"params": base}, ids)
    got = models.Decoder(adapted_config).apply({"params": adapted}, ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))

    layer = adapted["layers"] if scan_layers else adapted["layers_0"]
    stack = (config.num_layers,) if scan_layers else ()
    D = config.hidden_size
    for where in ("attn_adapter", "mlp_adapter"):
        block = layer[where]
        assert block["down"]["kernel"].shape == (*stack, D, BOTTLENECK)
        assert block["down"]["bias"].shape == (*stack, BOTTLENECK)
        assert block["up"]["kernel"].shape == (*stack, BOTTLENECK, D)
        assert not np.any(np.asarray(block["up"]["kernel"]))  # zero-initialised
    axes = models.logical_axes(models.Decoder(adapted_config))
    layer_axes = axes["layers"] if scan_layers else axes["layers_0"]
    prefix = ("layers",) if scan_layers else ()
    assert layer_axes["attn_adapter"]["down"]["kernel"] == (*prefix, "embed", "adapter")
    assert layer_axes["mlp_adapter"]["up"]["kernel"] == (*prefix, "adapter", "embed")
    assert layer_axes["mlp_adapter"]["up"]["bias"] == (*prefix, "embed")


def _adapter_by_hand(block, h_BxLxD):
    """h + up(gelu_tanh(down(h))), in numpy float64."""
    h = np.asarray(h_BxLxD, np.float64)
    down = h @ np.asarray(block["down"]["kernel"], np.float64) + np.asarray(block["down"]["bias"])
    gelu = 0.5 * down * (1 + np.tanh(np.sqrt(2 / np.pi) * (down + 0.044715 * down**3)))
    return h + gelu @ np.asarray(block["up"]["kernel"], np.float64) + np.asarray(block["up"]["bias"])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_trained_adapter_matches_a_hand_written_layer(name):
    config = models.get_config(name, bottleneck_adapter=BOTTLENECK)
    B, L, D = 2, 6, config.hidden_size
    x_BxLxD = jax.random.normal(jax.random.key(0), (B, L, D))
    valid_BxL = jnp.ones((B, L), jnp.int32)
    visible_BxLxS = visibility(valid_BxL, valid_BxL, 0)
    positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
    layer = DecoderLayer(config)
    params = nn.unbox(layer.init(jax.random.key(1), x_BxLxD, visible_BxLxS, positions_BxL, 0,
                                 False)["params"])
    # Non-zero adapters, so that both enter the output.
    keys = iter(jax.random.split(jax.random.key(2), 8))
    for where in ("attn_adapter", "mlp_adapter"):
        for part in ("down", "up"):
            for leaf in ("kernel", "bias"):
                shape = params[where][part][leaf].shape
                params[where][part][leaf] = 0.3 * jax.random.normal(next(keys), shape)

    got, _ = layer.apply({"params": params}, x_BxLxD, visible_BxLxS, positions_BxL, 0, False)

    # The reference: the base sublayers run alone, the adapters and residuals written out here.
    def run(module, name, *inputs):
        return np.asarray(module.apply({"params": params[name]}, *inputs), np.float64)

    h = run(norm(config, None), "input_layernorm", x_BxLxD)
    attn = run(Attention(config), "self_attn", jnp.asarray(h, jnp.float32), visible_BxLxS,
               positions_BxL, 0, False)
    x = np.asarray(x_BxLxD, np.float64) + _adapter_by_hand(params["attn_adapter"], attn)
    h = run(norm(config, None), "post_attention_layernorm", jnp.asarray(x, jnp.float32))
    mlp = run(MLP(config), "mlp", jnp.asarray(h, jnp.float32))
    expected = x + _adapter_by_hand(params["mlp_adapter"], mlp)

    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-5)
    assert np.abs(expected - (x + mlp)).max() > 1e-2  # the MLP's adapter changed the output


def test_negative_bottleneck_is_refused():
    with pytest.raises(ValueError, match="bottleneck_adapter"):
        models.get_config("tiny-llama", bottleneck_adapter=-1)
