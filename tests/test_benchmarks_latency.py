"""benchmarks.latency's Houlsby bottleneck adapter (train/adapters.py's `adapter_h`), built around
the unmodified model: trained, it is x + adapter(attn(norm(x))), then + adapter(mlp(norm(.)))
with adapter(h) = h + up(gelu(down(h))), checked against a float64 layer written here. (That a
zero up-projection is the base model, the parameter counts and decoding with the adapters are
tests/test_train_baselines.py's; timings are not tested.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from benchmarks.latency import DESIGN
from models.decoder import DecoderLayer
from models.layers import MLP, Attention, norm, visibility
from train import adapters

import tolerances as tol

BOTTLENECK = 5


def _adapted(config, key=1):
    """(model, base params, base params + zero-initialised adapters)."""
    model = models.Decoder(config)
    base = models.init_params(config, jax.random.key(0))
    return model, base, adapters.init(jax.random.key(key), base, DESIGN, BOTTLENECK)


def _adapter_by_hand(block, h_BxLxD):
    """h + up(gelu_tanh(down(h))), in numpy float64."""
    h = np.asarray(h_BxLxD, np.float64)
    down = h @ np.asarray(block["down"]["kernel"], np.float64) + np.asarray(block["down"]["bias"])
    gelu = 0.5 * down * (1 + np.tanh(np.sqrt(2 / np.pi) * (down + 0.044715 * down**3)))
    return (
        h + gelu @ np.asarray(block["up"]["kernel"], np.float64) + np.asarray(block["up"]["bias"])
    )


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_trained_adapter_matches_a_hand_written_layer(name):
    config = models.get_config(name)
    B, L, D = 2, 6, config.hidden_size
    x_BxLxD = jax.random.normal(jax.random.key(0), (B, L, D))
    valid_BxL = jnp.ones((B, L), jnp.int32)
    visible_BxLxS = visibility(valid_BxL, valid_BxL, 0)
    positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
    layer = DecoderLayer(config)
    inputs = (x_BxLxD, visible_BxLxS, positions_BxL, 0, False)
    base = nn.unbox(layer.init(jax.random.key(1), *inputs)["params"])
    params = adapters.init(jax.random.key(1), base, DESIGN, BOTTLENECK)
    # Non-zero adapters, so that both enter the output.
    keys = iter(jax.random.split(jax.random.key(2), 8))
    for sublayer in ("self_attn", "mlp"):
        for part in ("down", "up"):
            for leaf in ("kernel", "bias"):
                shape = params[sublayer]["adapter"][part][leaf].shape
                params[sublayer]["adapter"][part][leaf] = 0.3 * jax.random.normal(next(keys), shape)

    got, _ = adapters.apply(layer.apply, DESIGN)({"params": params}, *inputs)

    # The reference: the base sublayers run alone, the adapters and residuals written out here.
    def run(module, name, *inputs):
        own = {k: v for k, v in params[name].items() if k != "adapter"}
        return np.asarray(module.apply({"params": own}, *inputs), np.float64)

    h = run(norm(config, None), "input_layernorm", x_BxLxD)
    attn = run(
        Attention(config),
        "self_attn",
        jnp.asarray(h, jnp.float32),
        visible_BxLxS,
        positions_BxL,
        0,
        False,
    )
    x = np.asarray(x_BxLxD, np.float64) + _adapter_by_hand(params["self_attn"]["adapter"], attn)
    h = run(norm(config, None), "post_attention_layernorm", jnp.asarray(x, jnp.float32))
    mlp = run(MLP(config), "mlp", jnp.asarray(h, jnp.float32))
    expected = x + _adapter_by_hand(params["mlp"]["adapter"], mlp)

    # float32 through one layer on both sides (the reference's sublayers run in float32 too):
    # the layer's chain of tolerances.py, plus each adapter's down (D), up (BOTTLENECK) and gelu.
    n = tol.decoder_depth(
        layers=1, hidden=D, mlp=config.intermediate_size, head_dim=config.head_dim, keys=L
    ) + 2 * (D + BOTTLENECK + tol.ELEMENTWISE)
    atol = tol.chain_atol(n, tol.scale_of(expected))
    tol.assert_close(got, expected, atol)
    assert not tol.close(x + mlp, expected, atol)  # the MLP's adapter changed the output


def test_bottleneck_below_one_is_refused():
    with pytest.raises(ValueError, match="bottleneck must be >= 1"):
        params = models.init_params(models.get_config("tiny-llama"), jax.random.key(0))
        adapters.init(jax.random.key(1), params, DESIGN, 0)
