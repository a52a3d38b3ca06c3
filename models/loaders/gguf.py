"""GGUF files (llama.cpp) of the Llama architecture, dequantised with the `gguf` package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from models.config import ModelConfig
from models.loaders.checkpoint import (
    Rule,
    build_params,
    configure,
    linear,
    rename,
    same,
)
from models.loaders.hf import UnsupportedArchitectureError


def field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """The decoded value of metadata `key` (str, number or list), or `default` when absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader: gguf.GGUFReader, has_output: bool) -> ModelConfig:
    """ModelConfig from GGUF metadata; the LM head is tied when there is no `output.weight`."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedArchitectureError(
            f"unsupported GGUF architecture {arch!r}; supported: ('llama',)"
        )
    heads = field(reader, "llama.attention.head_count")
    hidden = field(reader, "llama.embedding_length")
    return ModelConfig(
        family="llama",
        vocab_size=field(reader, "llama.vocab_size") or len(field(reader, "tokenizer.ggml.tokens")),
        hidden_size=hidden,
        intermediate_size=field(reader, "llama.feed_forward_length"),
        num_layers=field(reader, "llama.block_count"),
        num_heads=heads,
        num_kv_heads=field(reader, "llama.attention.head_count_kv", heads),
        head_dim=field(reader, "llama.rope.dimension_count", hidden // heads),
        max_position_embeddings=field(reader, "llama.context_length"),
        tie_word_embeddings=not has_output,
        rope_theta=field(reader, "llama.rope.freq_base", 10000.0),
        norm_eps=field(reader, "llama.attention.layer_norm_rms_epsilon"),
        eos_token_id=field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=field(reader, "tokenizer.ggml.padding_token_id"),
    )


def unpermute_rope_rows(w_OxI: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE -> Hugging Face rotate-half).

    llama.cpp stores rows of head h as (head_dim/2, 2) pairs; Hugging Face as (2, head_dim/2).
    """
    O, I = w_OxI.shape
    return w_OxI.reshape(num_heads, O // num_heads // 2, 2, I).swapaxes(1, 2).reshape(O, I)


def _rope_linear(template: str, num_heads: int):
    to_kernel = linear(template)
    return lambda m, w: to_kernel(m, unpermute_rope_rows(w, num_heads))


def _rules(config: ModelConfig) -> list[Rule]:
    blk = r"blk\.(\d+)\."
    return [
        (r"token_embd\.weight", same("embed_tokens/embedding")),
        (blk + r"attn_q\.weight", _rope_linear(r"layers_\1/self_attn/q_proj/kernel", config.num_heads)),
        (blk + r"attn_k\.weight", _rope_linear(r"layers_\1/self_attn/k_proj/kernel", config.num_kv_heads)),
        (blk + r"attn_v\.weight", linear(r"layers_\1/self_attn/v_proj/kernel")),
        (blk + r"attn_output\.weight", linear(r"layers_\1/self_attn/o_proj/kernel")),
        (blk + r"ffn_gate\.weight", linear(r"layers_\1/mlp/gate_proj/kernel")),
        (blk + r"ffn_up\.weight", linear(r"layers_\1/mlp/up_proj/kernel")),
        (blk + r"ffn_down\.weight", linear(r"layers_\1/mlp/down_proj/kernel")),
        (blk + r"attn_norm\.weight", same(r"layers_\1/input_layernorm/scale")),
        (blk + r"ffn_norm\.weight", same(r"layers_\1/post_attention_layernorm/scale")),
        (r"output_norm\.weight", same("norm/scale")),
        (r"output\.weight", linear("lm_head/kernel")),
    ]


def dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    """float32 array of a GGUF tensor, shaped like torch (out, in) for matrices."""
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)


def load_gguf(path: str | Path, **options: Any) -> tuple[ModelConfig, dict[str, Any], gguf.GGUFReader]:
    """(config with `options` applied, params, reader) from a GGUF file; the reader carries the
    tokenizer metadata. Biases that `options` add (`attention_bias`, `mlp_bias`) are zeros."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    config, zeros = configure(config_from_gguf(reader, "output.weight" in names), options, str(path))
    named, unmatched = rename({t.name: dequantize(t) for t in reader.tensors}, _rules(config))
    named.update(zeros)  # build_params empties it, freeing each dequantised array once converted
    return config, build_params(named, unmatched, config, str(path)), reader
