"""Model configuration: one frozen dataclass for both decoder families, plus named presets."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS

FAMILIES = ("gpt2", "llama")

# Names accepted by `ModelConfig.remat_policy`; "none" disables rematerialisation.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3's RoPE frequency scaling (Hugging Face ``rope_type: "llama3"``).

    Frequencies whose wavelength is shorter than ``original_max_position_embeddings /
    high_freq_factor`` are kept; longer than ``... / low_freq_factor`` are divided by
    ``factor``; in between they are interpolated (models/layers.py ``rope_frequencies``).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only Transformer.

    family "gpt2": LayerNorm, learned positions, GELU (tanh) MLP, biases everywhere.
    family "llama": RMSNorm, rotate-half RoPE, SwiGLU MLP, grouped-query attention, no biases
    unless `attention_bias` (a bias (out,) on q/k/v/o_proj) or `mlp_bias` (on gate/up/down_proj)
    is set, as in Hugging Face's LlamaConfig; both are ignored for "gpt2", which has them all.
    `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters; both accept a
    dtype or its name ("bfloat16"). `attention` names the attention kernel, one of
    `models.attention.IMPLEMENTATIONS` ("auto" picks by sequence length; "chunked" holds no
    L×S array, for long sequences).
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # Llama 3's long-context frequency scaling
    norm_eps: float = 1e-5
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    attention: str = "auto"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat_policy {self.remat_policy!r}; expected one of {tuple(REMAT_POLICIES)}"
            )
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"unknown attention {self.attention!r}; expected one of {ATTENTION_IMPLEMENTATIONS}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))


def _gpt2(hidden: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(
        family="gpt2",
        vocab_size=50257,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=50256,
    )


def _llama3(
    hidden: int, mlp: int, layers: int, heads: int, head_dim: int, tied: bool, factor: float
) -> ModelConfig:
    """A Llama 3.1 / 3.2 shape: their configs share the vocabulary (128,256), 8 KV heads,
    RoPE θ = 500,000 with llama3 scaling from an original 8,192 context (low/high frequency
    factors 1 and 4) to 131,072 positions, RMSNorm ε = 1e-5, and EOS <|end_of_text|> 128001."""
    return ModelConfig(
        family="llama",
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=8,
        head_dim=head_dim,
        max_position_embeddings=131072,
        tie_word_embeddings=tied,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor, 1.0, 4.0, 8192),
        norm_eps=1e-5,
        eos_token_id=128001,
    )


PRESETS: dict[str, ModelConfig] = {
    # Shapes from the config.json files of meta-llama/Llama-3.2-1B, Llama-3.1-8B and
    # Llama-3.1-70B on the Hugging Face hub (hidden, MLP, layers, heads, head_dim, tied
    # embeddings, RoPE scaling factor); no weights ship with them.
    "llama-3.2-1b": _llama3(2048, 8192, 16, 32, 64, tied=True, factor=32.0),
    "llama-3.1-8b": _llama3(4096, 14336, 32, 32, 128, tied=False, factor=8.0),
    "llama-3.1-70b": _llama3(8192, 28672, 80, 64, 128, tied=False, factor=8.0),
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "smollm2-135m": ModelConfig(
        family="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        norm_eps=1e-5,
        eos_token_id=2,
        pad_token_id=2,
    ),
    "tiny-gpt2": ModelConfig(
        family="gpt2",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        eos_token_id=0,
        pad_token_id=0,
    ),
    "tiny-llama": ModelConfig(
        family="llama",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        eos_token_id=0,
        pad_token_id=0,
    ),
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name` with `overrides` applied (e.g. `scan_layers=True, dtype="bfloat16"`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
    return with_options(PRESETS[name], **overrides)


def with_options(config: ModelConfig, **overrides: Any) -> ModelConfig:
    """`config` with `overrides` applied; an unknown field name raises TypeError listing the fields."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown model option(s) {unknown}; valid options: {sorted(fields)}")
    return dataclasses.replace(config, **overrides)
