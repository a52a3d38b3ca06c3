"""Hugging Face checkpoints (config.json + *.safetensors) of GPT-2 and Llama architectures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from models.config import ModelConfig
from models.loaders.checkpoint import (
    Rule,
    build_params,
    configure,
    linear,
    rename,
    same,
)

SUPPORTED_MODEL_TYPES = ("gpt2", "llama")


class UnsupportedArchitectureError(ValueError):
    """A checkpoint whose architecture (or an option of it) this decoder does not implement."""


def _reject(condition: bool, what: str) -> None:
    if condition:
        raise UnsupportedArchitectureError(f"unsupported checkpoint option: {what}")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (model_type "gpt2" or "llama")."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        _reject(hf.get("activation_function", "gelu_new") != "gelu_new", "GPT-2 activation other than gelu_new")
        _reject(hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx")
        hidden, heads = hf["n_embd"], hf["n_head"]
        return ModelConfig(
            family="gpt2", vocab_size=hf["vocab_size"], hidden_size=hidden,
            intermediate_size=hf.get("n_inner") or 4 * hidden, num_layers=hf["n_layer"],
            num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
            max_position_embeddings=hf["n_positions"],
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
        )
    if model_type == "llama":
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        _reject(rope.get("rope_type", rope.get("type", "default")) != "default", f"RoPE scaling {rope}")
        _reject(hf.get("hidden_act", "silu") != "silu", f"Llama activation {hf.get('hidden_act')}")
        heads = hf["num_attention_heads"]
        return ModelConfig(
            family="llama", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            max_position_embeddings=hf["max_position_embeddings"],
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            eos_token_id=_first(hf.get("eos_token_id")), pad_token_id=hf.get("pad_token_id"),
            attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
        )
    raise UnsupportedArchitectureError(
        f"unsupported architecture model_type={model_type!r} "
        f"(architectures={hf.get('architectures')}); supported: {SUPPORTED_MODEL_TYPES}"
    )


def _first(token_id: int | list[int] | None) -> int | None:
    return token_id[0] if isinstance(token_id, list) else token_id


def _split_qkv(m, w: np.ndarray) -> dict[str, np.ndarray]:
    """GPT-2's fused c_attn (Conv1D, weight (in, 3*out), bias (3*out,)) -> q/k/v_proj."""
    prefix, leaf = f"layers_{m[1]}/self_attn", "kernel" if m[2] == "weight" else "bias"
    q, k, v = np.split(np.asarray(w), 3, axis=-1)
    return {f"{prefix}/{name}/{leaf}": part for name, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v))}


def _ignore(m, w) -> dict[str, np.ndarray]:
    return {}


def _gpt2_rules(config: ModelConfig) -> list[Rule]:
    # Conv1D weights are already (in, out); the optional "transformer." prefix varies by checkpoint.
    p, layer = r"(?:transformer\.)?", r"(?:transformer\.)?h\.(\d+)\."
    rules: list[Rule] = [
        (p + r"wte\.weight", same("embed_tokens/embedding")),
        (p + r"wpe\.weight", same("embed_positions/embedding")),
        (layer + r"ln_1\.weight", same(r"layers_\1/input_layernorm/scale")),
        (layer + r"ln_1\.bias", same(r"layers_\1/input_layernorm/bias")),
        (layer + r"ln_2\.weight", same(r"layers_\1/post_attention_layernorm/scale")),
        (layer + r"ln_2\.bias", same(r"layers_\1/post_attention_layernorm/bias")),
        (layer + r"attn\.c_attn\.(weight|bias)", _split_qkv),
        (layer + r"attn\.c_proj\.weight", same(r"layers_\1/self_attn/o_proj/kernel")),
        (layer + r"attn\.c_proj\.bias", same(r"layers_\1/self_attn/o_proj/bias")),
        (layer + r"mlp\.c_fc\.weight", same(r"layers_\1/mlp/up_proj/kernel")),
        (layer + r"mlp\.c_fc\.bias", same(r"layers_\1/mlp/up_proj/bias")),
        (layer + r"mlp\.c_proj\.weight", same(r"layers_\1/mlp/down_proj/kernel")),
        (layer + r"mlp\.c_proj\.bias", same(r"layers_\1/mlp/down_proj/bias")),
        (layer + r"attn\.(?:bias|masked_bias)", _ignore),  # causal-mask buffers of old checkpoints
        (p + r"ln_f\.weight", same("norm/scale")),
        (p + r"ln_f\.bias", same("norm/bias")),
    ]
    return rules + _lm_head_rule(config)


def _llama_rules(config: ModelConfig) -> list[Rule]:
    layer = r"model\.layers\.(\d+)\."
    return [
        (r"model\.embed_tokens\.weight", same("embed_tokens/embedding")),
        (layer + r"self_attn\.([qkvo])_proj\.weight", linear(r"layers_\1/self_attn/\2_proj/kernel")),
        (layer + r"mlp\.(gate|up|down)_proj\.weight", linear(r"layers_\1/mlp/\2_proj/kernel")),
        (layer + r"self_attn\.([qkvo])_proj\.bias", same(r"layers_\1/self_attn/\2_proj/bias")),
        (layer + r"mlp\.(gate|up|down)_proj\.bias", same(r"layers_\1/mlp/\2_proj/bias")),
        (layer + r"input_layernorm\.weight", same(r"layers_\1/input_layernorm/scale")),
        (layer + r"post_attention_layernorm\.weight", same(r"layers_\1/post_attention_layernorm/scale")),
        (r"model\.norm\.weight", same("norm/scale")),
    ] + _lm_head_rule(config)


def _lm_head_rule(config: ModelConfig) -> list[Rule]:
    # A tied head may still be saved; it is the embedding, so it is dropped.
    return [(r"lm_head\.weight", _ignore if config.tie_word_embeddings else linear("lm_head/kernel"))]


def read_safetensors(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of every *.safetensors file in `directory` (bfloat16 stays bfloat16)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors file in {directory} (pickle-based .bin/.pt checkpoints are not "
            "loaded; convert them with save_pretrained(..., safe_serialization=True))"
        )
    tensors = {}
    for f in files:
        with safe_open(f, framework="flax") as reader:
            tensors.update({k: np.asarray(reader.get_tensor(k)) for k in reader.keys()})
    return tensors


def hf_config(directory: str | Path, **options: Any) -> ModelConfig:
    """The config `load_hf` would give, from config.json alone: no tensor is read."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; is it a Hugging Face checkpoint?")
    config, _ = configure(config_from_hf(json.loads(config_file.read_text())), options,
                          str(directory))
    return config


def load_hf(directory: str | Path, **options: Any) -> tuple[ModelConfig, dict[str, Any]]:
    """(config with `options` applied, params) from a Hugging Face checkpoint directory.

    Biases that `options` add (`attention_bias`, `mlp_bias`) are zeros (`checkpoint.configure`).
    """
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; is it a Hugging Face checkpoint?")
    config, zeros = configure(config_from_hf(json.loads(config_file.read_text())), options,
                              str(directory))
    rules = _gpt2_rules(config) if config.family == "gpt2" else _llama_rules(config)
    named, unmatched = rename(read_safetensors(directory), rules)
    named.update(zeros)  # build_params empties it, freeing each host array once converted
    return config, build_params(named, unmatched, config, str(directory))

