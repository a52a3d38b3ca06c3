"""Params -> a Hugging Face checkpoint directory that
``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads (any family of
models/families.py: GPT-2, Llama).

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

from models import families
from models.config import ModelConfig

WEIGHTS_FILE = "model.safetensors"


def hf_state_dict(config: ModelConfig, params: Any) -> dict[str, jnp.ndarray]:
    """{transformers tensor name: array in torch layout} of (merged, unboxed) `params`,
    scanned (``layers/...`` with a leading layer axis) or not."""
    fused: dict[str, dict[int, jnp.ndarray]] = collections.defaultdict(dict)
    places = {}
    for keys, array in traverse_util.flatten_dict(params).items():
        path = "/".join(keys)
        stacked = config.scan_layers and keys[0] == "layers"
        for layer in range(array.shape[0]) if stacked else [None]:
            place = families.locate(config, path, layer) if keys[-1] in families.LEAVES else None
            if place is None:
                raise ValueError(
                    f"parameter {path!r} has no Hugging Face name; export merged "
                    "params (lj.merge(params)) of a models.Decoder"
                )
            name = place.tensor("hf")
            fused[name][place.module.part] = array if layer is None else array[layer]
            places[name] = place
    tensors = {}
    for name, parts in fused.items():
        value = (
            parts[0]
            if len(parts) == 1
            else jnp.concatenate([parts[i] for i in sorted(parts)], axis=-1)
        )
        tensors[name] = families.to_hf(places[name], value)
    return tensors


def save_tokenizer(directory: Path, tokenizer: Tokenizer, config: ModelConfig) -> None:
    """``tokenizer.json`` and a ``tokenizer_config.json`` for ``AutoTokenizer``."""
    tokenizer.save(str(directory / "tokenizer.json"))
    token = lambda i: None if i is None else tokenizer.id_to_token(i)
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": token(config.eos_token_id),
        "pad_token": token(config.pad_token_id),
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def save_hf(
    directory: str | Path, config: ModelConfig, params: Any, tokenizer: Tokenizer | None = None
) -> Path:
    """Write `params` (merged, in `config.param_dtype`) as a transformers checkpoint directory.

    Returns the directory; ``models.load(directory)`` reads it back.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(config, params)
    (directory / "config.json").write_text(json.dumps(families.hf_config(config), indent=2) + "\n")
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        save_tokenizer(directory, tokenizer, config)
    return directory
