"""The decoder-only Transformer (GPT-2 and Llama families) and helpers over its variables."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.attention import Visibility, visibility
from models.config import REMAT_POLICIES, ModelConfig
from models.layers import MLP, Attention, dense, embed, norm

# Logical axis names of the activations that the decoder constrains (the residual stream
# at each layer's input and the logits): a caller that sets flax's logical axis rules and a
# mesh (train/mesh.py ``ACTIVATION_RULES``) pins how they are split; without rules the
# constraints are no-ops.
RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). Returns (x_BxLxD, None) for nn.scan."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, visible, positions_BxL, cache_offset, decode: bool):
        cfg = self.config
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, RESIDUAL_AXES)
        h_BxLxD = norm(cfg, "input_layernorm")(x_BxLxD)
        x_BxLxD = x_BxLxD + Attention(cfg, name="self_attn")(
            h_BxLxD, visible, positions_BxL, cache_offset, decode
        )
        h_BxLxD = norm(cfg, "post_attention_layernorm")(x_BxLxD)
        return x_BxLxD + MLP(cfg, name="mlp")(h_BxLxD), None


class Decoder(nn.Module):
    """Token ids (B, L) int32 -> float32 logits (B, L, vocab).

    `attention_mask` (B, L): 1 for real tokens, 0 for padding (default all ones).
    `positions` (B, L): position ids (default: 0..L-1, shifted by the cache fill when decoding).
    `segment_ids` (B, L) int: packed rows, 1, 2, ... per example and 0 on padding; a token
    attends only to earlier tokens of its own (non-zero) segment. Give each example's
    `positions` restarting at 0 with it. Not with `decode` (a cache holds one sequence per row).
    `decode=True` reads and extends the KV cache in the 'cache' collection; create it with
    `init_cache` and call `apply(..., decode=True, mutable=["cache"])`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self, token_ids, attention_mask=None, positions=None, decode: bool = False, segment_ids=None
    ):
        cfg = self.config
        token_ids_BxL = jnp.asarray(token_ids, jnp.int32)
        B, L = token_ids_BxL.shape
        if cfg.max_position_embeddings < L:
            raise ValueError(
                f"input has {L} tokens but the model's context is {cfg.max_position_embeddings}"
            )
        valid_BxL = (
            jnp.ones((B, L), bool)
            if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool)
        )
        key_valid_BxS, cache_offset = self._cache_mask(valid_BxL, decode)
        visible = self._visibility(valid_BxL, key_valid_BxS, cache_offset, segment_ids, decode)
        if positions is None:
            positions = jnp.broadcast_to(cache_offset + jnp.arange(L, dtype=jnp.int32), (B, L))
        positions_BxL = jnp.asarray(positions, jnp.int32)

        embed_tokens = embed(cfg, cfg.vocab_size, ("vocab", "embed"), "embed_tokens")
        x_BxLxD = embed_tokens(token_ids_BxL)
        if cfg.family == "gpt2":
            x_BxLxD = x_BxLxD + embed(
                cfg, cfg.max_position_embeddings, (None, "embed"), "embed_positions"
            )(positions_BxL)

        layer = DecoderLayer
        if cfg.remat_policy != "none":
            layer = nn.remat(layer, policy=REMAT_POLICIES[cfg.remat_policy], static_argnums=(5,))
        if cfg.scan_layers:
            stack = nn.scan(
                layer,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * 4,
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BxLxD, _ = stack(cfg, name="layers")(
                x_BxLxD, visible, positions_BxL, cache_offset, decode
            )
        else:
            for i in range(cfg.num_layers):
                x_BxLxD, _ = layer(cfg, name=f"layers_{i}")(
                    x_BxLxD, visible, positions_BxL, cache_offset, decode
                )

        x_BxLxD = norm(cfg, "norm")(nn.with_logical_constraint(x_BxLxD, RESIDUAL_AXES))
        if cfg.tie_word_embeddings:
            logits_BxLxV = embed_tokens.attend(x_BxLxD)
        else:
            logits_BxLxV = dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head")(x_BxLxD)
        return nn.with_logical_constraint(logits_BxLxV.astype(jnp.float32), LOGITS_AXES)

    @staticmethod
    def _visibility(
        valid_BxL, key_valid_BxS, cache_offset, segment_ids, decode: bool
    ) -> Visibility:
        """The key slots each query sees (`models.attention.Visibility`).

        Without `segment_ids` every query is in segment 1 and so is every valid key: padding
        hides keys only, as `attention_mask` always has. With them (no cache, so S == L) a
        query sees the valid keys of its own segment; a padding query (segment 0) sees none.
        """
        if segment_ids is None:
            query_segment_BxL = jnp.ones(valid_BxL.shape, jnp.int32)
            return visibility(query_segment_BxL, key_valid_BxS.astype(jnp.int32), cache_offset)
        if decode:
            raise ValueError(
                "segment_ids (packed rows) cannot be used with decode=True: the KV cache holds "
                "one sequence per row; decode each example in its own row without segment_ids"
            )
        segment_ids_BxL = jnp.asarray(segment_ids, jnp.int32)
        if segment_ids_BxL.shape != valid_BxL.shape:
            raise ValueError(
                f"segment_ids have shape {segment_ids_BxL.shape}, the tokens {valid_BxL.shape}"
            )
        key_segment_BxS = jnp.where(key_valid_BxS, segment_ids_BxL, 0)
        return visibility(segment_ids_BxL, key_segment_BxS, cache_offset)

    def _cache_mask(self, valid_BxL, decode: bool):
        """(key validity over all key slots, slot of the first new token).

        When decoding, the cache keeps `index` (tokens written so far) and `valid` (B, S),
        the padding mask of every written slot.
        """
        if not decode:
            return valid_BxL, 0
        cache_exists = self.has_variable("cache", "index")
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        valid = self.variable("cache", "valid", jnp.zeros, valid_BxL.shape, bool)
        if not cache_exists:
            return valid_BxL, 0
        offset = index.value
        valid.value = jax.lax.dynamic_update_slice(valid.value, valid_BxL, (0, offset))
        index.value = offset + valid_BxL.shape[1]
        return valid.value, offset


def as_model(model_or_config: Decoder | ModelConfig) -> Decoder:
    """The Decoder for a config, or the Decoder itself."""
    return model_or_config if isinstance(model_or_config, Decoder) else Decoder(model_or_config)


def abstract_variables(
    model: Decoder, batch_size: int, length: int, decode: bool
) -> dict[str, Any]:
    ids = jnp.zeros((batch_size, length), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids, decode=decode))


def init_params(model_or_config: Decoder | ModelConfig, rng: jax.Array) -> dict[str, Any]:
    """Randomly initialised, unboxed parameters."""
    model = as_model(model_or_config)
    return nn.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])


def logical_axes(model_or_config: Decoder | ModelConfig) -> dict[str, Any]:
    """Logical axis names of every parameter: a tree shaped like the unboxed params whose leaves
    are tuples such as ('embed', 'heads'), with 'layers' first for scanned parameters
    (None marks an unnamed axis). Use as `jax.tree.map(fn, params, logical_axes(model))`."""
    boxed = abstract_variables(as_model(model_or_config), 1, 1, decode=False)["params"]
    return jax.tree.map(
        lambda p: tuple(p.names), boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def init_cache(model: Decoder, batch_size: int, max_length: int) -> dict[str, Any]:
    """An empty KV cache (the 'cache' collection) for `batch_size` rows of up to `max_length` tokens."""
    if max_length > model.config.max_position_embeddings:
        raise ValueError(
            f"{max_length} tokens exceed the model's context of {model.config.max_position_embeddings}"
        )
    shapes = abstract_variables(model, batch_size, max_length, decode=True)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def reorder_cache(cache: dict[str, Any], rows_R: jax.Array) -> dict[str, Any]:
    """The cache of batch rows `rows_R` (int (R,)), e.g. the surviving beams.

    Layout: `index` () is shared, as is any other scalar (a mark a wrapper keeps there);
    `valid` is (B, S); each layer's `key`/`value` is (B, S, K, H), with a leading layer axis
    when the layers are scanned.
    """

    def take(path, x):
        name = path[-1].key
        if jnp.ndim(x) == 0:
            return x
        return jnp.take(x, rows_R, axis=x.ndim - (2 if name == "valid" else 4))

    return jax.tree_util.tree_map_with_path(take, cache)
