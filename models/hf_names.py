"""PEFT module maps of the decoder: the Hugging Face (transformers) modules holding the weights
LoRA adapts, for ``lj.to_peft`` / ``lj.from_peft``, read off the family's table in
models/families.py (which loading and hf_export.py read too). GPT-2's fused ``c_attn`` (a
``Conv1D``, weight (in, 3·D)) holds our q/k/v_proj as output blocks 0, 1, 2 of 3.
"""

from __future__ import annotations

from lora_jax.peft import KINDS, HFModule, ModuleMap
from models import families
from models.config import ModelConfig


def hf_module(config: ModelConfig, path: str, layer: int | None = None) -> HFModule | None:
    """The transformers module holding our parameter `path` (``"layers_0/mlp/up_proj/kernel"``,
    or a scanned ``"layers/mlp/up_proj/kernel"`` with its `layer` index); None if unknown."""
    place = families.locate(config, path, layer)
    if place is None:
        return None
    return HFModule(place.hf, place.module.kind, place.module.part, place.module.parts)


def tied_modules(config: ModelConfig) -> dict[str, str | None]:
    """``tied`` for ``lj.to_peft`` / ``lj.from_peft``: {embedding module: the output module that
    shares its table}; None for GPT-2, whose ``wte`` PEFT does not tie to ``lm_head``."""
    if not config.tie_word_embeddings:
        return {}
    head = (
        families.locate(config, "lm_head/kernel").hf
        if families.family(config).peft_ties_head
        else None
    )
    return {families.locate(config, "embed_tokens/embedding").hf: head}


def peft_module_map(config: ModelConfig) -> ModuleMap:
    """The module map of `config`'s family for ``lj.to_peft`` / ``lj.from_peft``: the weights
    LoRA can adapt (Linear, Conv1D, Embedding), by their transformers module names."""

    def module_map(path: str, layer: int | None) -> HFModule | None:
        module = hf_module(config, path, layer)
        return module if module is not None and module.kind in KINDS else None

    return module_map
