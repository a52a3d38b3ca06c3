"""GGUF files (llama.cpp) of the Llama architecture, dequantised with the `gguf` package."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping
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


def field(reader: gguf.GGUFReader | Mapping[str, Any], key: str, default: Any = None) -> Any:
    """The decoded value of metadata `key` (str, number or list), or `default` when absent;
    `reader` may also be the metadata dict of `read_metadata`."""
    if isinstance(reader, Mapping):
        return reader.get(key, default)
    f = reader.fields.get(key)
    return default if f is None else f.contents()


# GGUF value types (gguf.GGUFValueType) -> struct format; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9


def read_metadata(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """(metadata {key: value}, tensor names) of a GGUF file (version 2 or 3), values decoded as
    `GGUFReader`'s `contents()` decodes them. Reads only the header, in plain Python: a
    `GGUFReader` builds a numpy view of every array element (SmolLM2's 100k vocabulary
    strings: seconds), which a config does not need."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
        order = "<" if struct.unpack_from("<I", data, 4)[0] < 0x10000 else ">"
        version = struct.unpack_from(order + "I", data, 4)[0]
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3 are)")
        offset = 8

        def unpack(fmt: str) -> Any:
            nonlocal offset
            value = struct.unpack_from(order + fmt, data, offset)[0]
            offset += struct.calcsize(order + fmt)
            return value

        def string() -> str:
            nonlocal offset
            size = unpack("Q")
            offset += size
            return str(data[offset - size:offset], encoding="utf-8")

        def value(kind: int) -> Any:
            nonlocal offset
            if kind == _STRING:
                return string()
            if kind == _ARRAY:
                item, count = unpack("I"), unpack("Q")
                if item in _SCALARS:
                    fmt = f"{order}{count}{_SCALARS[item]}"
                    items = list(struct.unpack_from(fmt, data, offset))
                    offset += struct.calcsize(fmt)
                    return items
                return [value(item) for _ in range(count)]
            return unpack(_SCALARS[kind])

        n_tensors, n_fields = unpack("Q"), unpack("Q")
        metadata = {}
        for _ in range(n_fields):
            key = string()
            metadata[key] = value(unpack("I"))
        names = []
        for _ in range(n_tensors):
            names.append(string())
            n_dims = unpack("I")
            offset += 8 * n_dims + 4 + 8  # dims (u64 each), type (u32), data offset (u64)
    return metadata, names


def config_from_gguf(reader: gguf.GGUFReader | Mapping[str, Any], has_output: bool) -> ModelConfig:
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


def gguf_config(path: str | Path, **options: Any) -> ModelConfig:
    """The config `load_gguf` would give, from the file's header alone (`read_metadata`: the
    metadata and tensor names; no tensor data is read or dequantised)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    metadata, names = read_metadata(path)
    config, _ = configure(config_from_gguf(metadata, "output.weight" in names), options, str(path))
    return config


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
