"""Hugging Face (transformers) module names of the decoder's parameters.

One table per family serves both directions of interop: PEFT adapters
(`peft_module_map`, for ``lj.to_peft`` / ``lj.from_peft``) and merged checkpoints
(models/hf_export.py). It is the inverse of the renaming rules in loaders/hf.py.
GPT-2's fused ``c_attn`` (a ``Conv1D``, weight (in, 3·D)) holds our q/k/v_proj as
output blocks 0, 1, 2 of 3.
"""

from __future__ import annotations

import re

from lora_jax.peft import KINDS, HFModule, ModuleMap
from models.config import ModelConfig

# (our module path regex, transformers module name template, kind[, part, parts]);
# kind "norm" marks parameters stored as they are that LoRA never adapts.
_LAYER = r"layers_(\d+)/"
_TABLES = {
    "gpt2": [
        (r"embed_tokens", "transformer.wte", "embedding"),
        (r"embed_positions", "transformer.wpe", "embedding"),
        (_LAYER + "input_layernorm", r"transformer.h.\1.ln_1", "norm"),
        (_LAYER + "post_attention_layernorm", r"transformer.h.\1.ln_2", "norm"),
        (_LAYER + "self_attn/q_proj", r"transformer.h.\1.attn.c_attn", "conv1d", 0, 3),
        (_LAYER + "self_attn/k_proj", r"transformer.h.\1.attn.c_attn", "conv1d", 1, 3),
        (_LAYER + "self_attn/v_proj", r"transformer.h.\1.attn.c_attn", "conv1d", 2, 3),
        (_LAYER + "self_attn/o_proj", r"transformer.h.\1.attn.c_proj", "conv1d"),
        (_LAYER + "mlp/up_proj", r"transformer.h.\1.mlp.c_fc", "conv1d"),
        (_LAYER + "mlp/down_proj", r"transformer.h.\1.mlp.c_proj", "conv1d"),
        (r"norm", "transformer.ln_f", "norm"),
        (r"lm_head", "lm_head", "linear"),
    ],
    "llama": [
        (r"embed_tokens", "model.embed_tokens", "embedding"),
        (_LAYER + r"(input_layernorm|post_attention_layernorm)", r"model.layers.\1.\2", "norm"),
        (_LAYER + r"self_attn/([qkvo]_proj)", r"model.layers.\1.self_attn.\2", "linear"),
        (_LAYER + r"mlp/((?:gate|up|down)_proj)", r"model.layers.\1.mlp.\2", "linear"),
        (r"norm", "model.norm", "norm"),
        (r"lm_head", "lm_head", "linear"),
    ],
}


def hf_module(config: ModelConfig, path: str, layer: int | None = None) -> HFModule | None:
    """The transformers module holding our parameter `path` (``"layers_0/mlp/up_proj/kernel"``,
    or a scanned ``"layers/mlp/up_proj/kernel"`` with its `layer` index); None if unknown."""
    module_path = path.rsplit("/", 1)[0]
    if layer is not None:
        module_path = re.sub(r"^layers/", f"layers_{layer}/", module_path)
    for pattern, template, kind, *part in _TABLES[config.family]:
        match = re.fullmatch(pattern, module_path)
        if match:
            return HFModule(match.expand(template), kind, *part)
    return None


def tied_modules(config: ModelConfig) -> dict[str, str | None]:
    """``tied`` for ``lj.to_peft`` / ``lj.from_peft``: {embedding module: the output module that
    shares its table}; None for GPT-2, whose ``wte`` PEFT does not tie to ``lm_head``."""
    if not config.tie_word_embeddings:
        return {}
    return {"transformer.wte": None} if config.family == "gpt2" else {"model.embed_tokens": "lm_head"}


def peft_module_map(config: ModelConfig) -> ModuleMap:
    """The module map of `config`'s family for ``lj.to_peft`` / ``lj.from_peft``: the weights
    LoRA can adapt (Linear, Conv1D, Embedding), by their transformers module names."""

    def module_map(path: str, layer: int | None) -> HFModule | None:
        module = hf_module(config, path, layer)
        return module if module is not None and module.kind in KINDS else None

    return module_map
