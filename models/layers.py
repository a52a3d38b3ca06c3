"""Building blocks of the decoder: dense layers, norms, RoPE, attention with a KV cache, MLPs
(the attention kernels themselves are in models/attention.py).

Shape letters: B batch, L new tokens, S key slots (L, or the cache length when decoding),
D hidden, N query heads, K key/value heads, G = N // K, H head_dim, F MLP width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.attention import Visibility, attend
from models.attention import visibility as visibility  # re-exported: callers build masks here
from models.config import ModelConfig, RopeScaling

_INIT_STD = 0.02


def dense(
    config: ModelConfig, features: int, axes: tuple[str, str], name: str, use_bias: bool = False
) -> nn.Dense:
    """An `nn.Dense` with kernel (in, out) named by logical `axes` and, with `use_bias`, a
    zero-initialised bias (out,) named by `axes[1:]`."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(_INIT_STD), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
        name=name,
    )


def embed(config: ModelConfig, num: int, axes: tuple[str | None, str], name: str) -> nn.Embed:
    """An `nn.Embed` table (num, hidden) named by logical `axes`."""
    return nn.Embed(
        num,
        config.hidden_size,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(_INIT_STD), axes),
        name=name,
    )


def norm(config: ModelConfig, name: str) -> nn.Module:
    """LayerNorm (scale, bias) for GPT-2, RMSNorm (scale) for Llama, over the 'embed' axis."""
    ones = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
    if config.family == "gpt2":
        zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))
        return nn.LayerNorm(
            epsilon=config.norm_eps,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            use_fast_variance=False,
            scale_init=ones,
            bias_init=zeros,
            name=name,
        )
    return nn.RMSNorm(
        epsilon=config.norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        scale_init=ones,
        name=name,
    )


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """float32 [head_dim / 2]: RoPE's inverse frequencies θ^(-2i/H), in radians per position,
    with Llama 3's scaling when given: a frequency of wavelength λ = 2π/f is kept when
    λ < L0/high, divided by ``factor`` when λ > L0/low, and between those interpolated,
    f·((1 − t)/factor + t) with t = (L0/λ − low)/(high − low), L0 the original context."""
    inv_freq_h = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling is None:
        return inv_freq_h
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    context = scaling.original_max_position_embeddings
    wavelength_h = 2 * jnp.pi / inv_freq_h
    t_h = (context / wavelength_h - low) / (high - low)
    interpolated_h = inv_freq_h * ((1 - t_h) / scaling.factor + t_h)
    return jnp.where(
        wavelength_h < context / high,
        inv_freq_h,
        jnp.where(wavelength_h > context / low, inv_freq_h / scaling.factor, interpolated_h),
    )


def apply_rope(
    x_BxLxNxH: jax.Array,
    positions_BxL: jax.Array,
    theta: float,
    scaling: RopeScaling | None = None,
) -> jax.Array:
    """Rotate-half rotary embedding (the Hugging Face Llama convention), computed in float32."""
    inv_freq_h = rope_frequencies(x_BxLxNxH.shape[-1], theta, scaling)
    angles_BxLxh = positions_BxL[..., None].astype(jnp.float32) * inv_freq_h
    angles_BxLx1xH = jnp.concatenate([angles_BxLxh, angles_BxLxh], axis=-1)[:, :, None, :]
    x = x_BxLxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * jnp.cos(angles_BxLx1xH) + rotated * jnp.sin(angles_BxLx1xH)
    return out.astype(x_BxLxNxH.dtype)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with separate q/k/v/o projections.

    In decode mode the keys and values of the new tokens are written into the 'cache'
    collection (`key`, `value`: (B, S, K, H)) at slot `cache_offset`, and the queries attend
    over the whole cache. The call that creates the cache (model.init) attends normally.
    `visible` (`models.attention.Visibility`) says which key slots each query sees; the kernel
    is `config.attention` (`models.attention.attend`). The projections have biases in GPT-2,
    and in Llama when `attention_bias`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, visible: Visibility, positions_BxL, cache_offset, decode: bool):
        cfg = self.config
        B, L, D = x_BxLxD.shape
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.family == "gpt2" or cfg.attention_bias
        q_BxLxNxH = dense(cfg, N * H, ("embed", "heads"), "q_proj", bias)(x_BxLxD).reshape(
            B, L, N, H
        )
        k_BxLxKxH = dense(cfg, K * H, ("embed", "kv_heads"), "k_proj", bias)(x_BxLxD).reshape(
            B, L, K, H
        )
        v_BxLxKxH = dense(cfg, K * H, ("embed", "kv_heads"), "v_proj", bias)(x_BxLxD).reshape(
            B, L, K, H
        )
        if cfg.family == "llama":
            q_BxLxNxH = apply_rope(q_BxLxNxH, positions_BxL, cfg.rope_theta, cfg.rope_scaling)
            k_BxLxKxH = apply_rope(k_BxLxKxH, positions_BxL, cfg.rope_theta, cfg.rope_scaling)
        k_BxSxKxH, v_BxSxKxH = k_BxLxKxH, v_BxLxKxH
        if decode:
            cache_exists = self.has_variable("cache", "key")
            key = self.variable("cache", "key", jnp.zeros, k_BxLxKxH.shape, cfg.dtype)
            value = self.variable("cache", "value", jnp.zeros, v_BxLxKxH.shape, cfg.dtype)
            if cache_exists:
                start = (0, cache_offset, 0, 0)
                key.value = jax.lax.dynamic_update_slice(
                    key.value, k_BxLxKxH.astype(cfg.dtype), start
                )
                value.value = jax.lax.dynamic_update_slice(
                    value.value, v_BxLxKxH.astype(cfg.dtype), start
                )
                k_BxSxKxH, v_BxSxKxH = key.value, value.value
        y_BxLxNxH = attend(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, visible, cfg.attention)
        return dense(cfg, D, ("heads", "embed"), "o_proj", bias)(y_BxLxNxH.reshape(B, L, N * H))


class MLP(nn.Module):
    """GPT-2: down(gelu_tanh(up(x))). Llama: down(silu(gate(x)) * up(x)).

    Every projection has a bias in GPT-2, and in Llama when `mlp_bias`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.config
        bias = cfg.family == "gpt2" or cfg.mlp_bias
        up_BxLxF = dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "up_proj", bias)(x_BxLxD)
        if cfg.family == "gpt2":
            h_BxLxF = jax.nn.gelu(up_BxLxF, approximate=True)
        else:
            gate_BxLxF = dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "gate_proj", bias)(
                x_BxLxD
            )
            h_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
        return dense(cfg, cfg.hidden_size, ("mlp", "embed"), "down_proj", bias)(h_BxLxF)
