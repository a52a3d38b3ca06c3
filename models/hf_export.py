"""Params -> a Hugging Face checkpoint directory that
``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads (GPT-2 and Llama families).

The inverse of ``models.load(DIR)``: ``config.json``, ``model.safetensors`` (torch layouts:
Linear weights (out, in), GPT-2 Conv1D weights (in, out) with q/k/v fused into ``c_attn``)
and, given a tokenizer, ``tokenizer.json`` + ``tokenizer_config.json``. Export merged
params (``lj.merge``): a tree that still holds LoRA leaves is refused.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import traverse_util
from safetensors.flax import save_file
from tokenizers import Tokenizer

from models.config import ModelConfig
from models.hf_names import hf_module

WEIGHTS_FILE = "model.safetensors"
_LEAVES = ("kernel", "embedding", "scale", "bias")  # the parameter names of a models.Decoder


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """The transformers ``config.json`` dict of `config` (what loaders/hf.py reads back)."""
    common = dict(vocab_size=config.vocab_size, tie_word_embeddings=config.tie_word_embeddings,
                  eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                  dtype=str(config.param_dtype))
    if config.family == "gpt2":
        if config.num_kv_heads != config.num_heads or config.head_dim * config.num_heads != config.hidden_size:
            raise ValueError("a GPT-2 checkpoint needs num_kv_heads == num_heads and "
                             "head_dim * num_heads == hidden_size")
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=config.hidden_size,
                    n_layer=config.num_layers, n_head=config.num_heads,
                    n_inner=config.intermediate_size, n_positions=config.max_position_embeddings,
                    layer_norm_epsilon=config.norm_eps, activation_function="gelu_new",
                    bos_token_id=config.eos_token_id, **common)
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    return dict(architectures=["LlamaForCausalLM"], model_type="llama",
                hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
                max_position_embeddings=config.max_position_embeddings,
                rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, rope_parameters=rope,
                hidden_act="silu", attention_bias=config.attention_bias,
                mlp_bias=config.mlp_bias, bos_token_id=None, **common)


def hf_state_dict(config: ModelConfig, params: Any) -> dict[str, jnp.ndarray]:
    """{transformers tensor name: array in torch layout} of (merged, unboxed) `params`,
    scanned (``layers/...`` with a leading layer axis) or not."""
    fused: dict[str, dict[int, jnp.ndarray]] = collections.defaultdict(dict)
    for keys, array in traverse_util.flatten_dict(params).items():
        path = "/".join(keys)
        stacked = config.scan_layers and keys[0] == "layers"
        for layer in range(array.shape[0]) if stacked else [None]:
            module = hf_module(config, path, layer) if keys[-1] in _LEAVES else None
            if module is None:
                raise ValueError(f"parameter {path!r} has no Hugging Face name; export merged "
                                 "params (lj.merge(params)) of a models.Decoder")
            value = array if layer is None else array[layer]
            if module.kind == "linear" and keys[-1] == "kernel":
                value = value.T
            name = f"{module.name}.{'bias' if keys[-1] == 'bias' else 'weight'}"
            fused[name][module.part] = value
    return {name: parts[0] if len(parts) == 1 else
            jnp.concatenate([parts[i] for i in sorted(parts)], axis=-1)
            for name, parts in fused.items()}


def save_tokenizer(directory: Path, tokenizer: Tokenizer, config: ModelConfig) -> None:
    """``tokenizer.json`` and a ``tokenizer_config.json`` for ``AutoTokenizer``."""
    tokenizer.save(str(directory / "tokenizer.json"))
    token = lambda i: None if i is None else tokenizer.id_to_token(i)
    settings = {"tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": token(config.eos_token_id), "pad_token": token(config.pad_token_id),
                "model_max_length": config.max_position_embeddings,
                "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def save_hf(directory: str | Path, config: ModelConfig, params: Any,
            tokenizer: Tokenizer | None = None) -> Path:
    """Write `params` (merged, in `config.param_dtype`) as a transformers checkpoint directory.

    Returns the directory; ``models.load(directory)`` reads it back.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(config, params)
    (directory / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        save_tokenizer(directory, tokenizer, config)
    return directory
