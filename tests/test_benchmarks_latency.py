"""benchmarks.latency's Houlsby bottleneck adapter (train/adapters.py's `adapter_h`), built around
the unmodified model:
with a zero up-projection it is the base model; trained it is x + adapter(attn(norm(x))), then
+ adapter(mlp(norm(.))) with adapter(h) = h + up(gelu(down(h))). (Timings are not tested.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from benchmarks.latency import DESIGN, adapter_params, randomize
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


@pytest.mark.parametrize(("name", "scan_layers"), [("tiny-llama", True), ("tiny-gpt2", False)])
def test_zero_up_projection_is_the_base_model(name, scan_layers):
    config = models.get_config(name, scan_layers=scan_layers)
    model, base, adapted = _adapted(config)
    ids = jax.random.randint(jax.random.key(2), (2, 7), 0, config.vocab_size)

    expected = model.apply({"params": base}, ids)
    got = adapters.apply(model.apply, DESIGN)({"params": adapted}, ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    tokens = models.generate(model, base, ids, max_new_tokens=4, eos_token_id=-1)
    np.testing.assert_array_equal(
        models.generate(
            model,
            adapted,
            ids,
            max_new_tokens=4,
            eos_token_id=-1,
            apply_fn=adapters.apply(model.apply, DESIGN),
        ),
        tokens,
    )

    layer = adapted["layers"] if scan_layers else adapted["layers_0"]
    stack = (config.num_layers,) if scan_layers else ()
    D = config.hidden_size
    for sublayer in ("self_attn", "mlp"):
        block = layer[sublayer]["adapter"]
        assert block["down"]["kernel"].shape == (*stack, D, BOTTLENECK)
        assert block["down"]["bias"].shape == (*stack, BOTTLENECK)
        assert block["up"]["kernel"].shape == (*stack, BOTTLENECK, D)
        assert not np.any(np.asarray(block["up"]["kernel"]))  # zero-initialised
    extra = sum(x.size for x in jax.tree.leaves(adapted)) - sum(
        x.size for x in jax.tree.leaves(base)
    )
    assert (
        extra == adapter_params(config, BOTTLENECK) == 2 * 2 * (2 * D * BOTTLENECK + BOTTLENECK + D)
    )


def test_a_non_zero_adapter_changes_the_outputs():
    config = models.get_config("tiny-llama")
    model, base, adapted = _adapted(config)
    adapted = randomize(adapted, lambda p: "/adapter/up/" in p, jax.random.key(4), std=0.3)
    ids = jax.random.randint(jax.random.key(2), (1, 7), 0, config.vocab_size)
    apply = adapters.apply(model.apply, DESIGN)
    got = apply({"params": adapted}, ids)
    assert np.abs(np.asarray(got) - np.asarray(model.apply({"params": base}, ids))).max() > 1e-2
    # models.generate runs the adapters too (decoding with the KV cache): its greedy tokens are
    # those of the adapted model's full forward, which are not the base model's.
    tokens = np.asarray(
        models.generate(model, adapted, ids, max_new_tokens=6, eos_token_id=-1, apply_fn=apply)
    )
    # the model is causal: one forward over prompt + generated tokens gives, at each position,
    # the logits greedy decoding saw there, so each token is the argmax one position before
    full = apply({"params": adapted}, np.concatenate([np.asarray(ids), tokens], axis=1))
    np.testing.assert_array_equal(tokens, np.argmax(np.asarray(full)[:, 6:12], -1))
    assert not np.array_equal(
        tokens, models.generate(model, base, ids, max_new_tokens=6, eos_token_id=-1)
    )


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
