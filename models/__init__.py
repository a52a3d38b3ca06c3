"""Decoder-only Transformers (GPT-2 and Llama families) for LoRA: config, module, loaders,
tokenizers and generation.

    model, params, tokenizer = models.load("smollm2-135m")
    logits = model.apply({"params": params}, token_ids)            # (B, L) int32 -> (B, L, V) f32
    new_ids = models.generate(model, params, prompt_ids, max_new_tokens=20)
    model, shapes = models.abstract_load("smollm2-135m")  # params as ShapeDtypeStructs; reads no weight
    model, params, tokenizer = models.load(path, shardings=lambda model, shapes: tree_of_shardings)
    # params: global jax.Arrays; each process reads only the blocks its devices hold
"""

from models.config import PRESETS, REMAT_POLICIES, ModelConfig, get_config, with_options
from models.decoder import Decoder, init_cache, init_params, logical_axes
from models.generate import generate
from models.loaders import (
    ModelFileError,
    UnsupportedArchitectureError,
    abstract_load,
    embedded_gguf,
    load,
)

__all__ = [
    "PRESETS",
    "REMAT_POLICIES",
    "ModelConfig",
    "get_config",
    "with_options",
    "Decoder",
    "init_cache",
    "init_params",
    "logical_axes",
    "generate",
    "ModelFileError",
    "UnsupportedArchitectureError",
    "abstract_load",
    "embedded_gguf",
    "load",
]
