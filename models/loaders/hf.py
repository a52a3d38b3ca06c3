"""Hugging Face checkpoints (config.json + *.safetensors) of the families in models/families.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from models import families
from models.config import ModelConfig
from models.families import UnsupportedArchitectureError
from models.loaders.checkpoint import build_params, configure, rename

SUPPORTED_MODEL_TYPES = tuple(families.FAMILIES)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedArchitectureError",
    "config_from_hf",
    "hf_config",
    "load_hf",
    "read_safetensors",
]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (a model_type of models/families.py)."""
    return families.hf_family(hf).config_from_hf(hf)


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


def _configure(
    directory: Path, options: dict[str, Any]
) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; is it a Hugging Face checkpoint?")
    return configure(config_from_hf(json.loads(config_file.read_text())), options, str(directory))


def hf_config(directory: str | Path, **options: Any) -> ModelConfig:
    """The config `load_hf` would give, from config.json alone: no tensor is read."""
    return _configure(Path(directory), options)[0]


def load_hf(directory: str | Path, **options: Any) -> tuple[ModelConfig, dict[str, Any]]:
    """(config with `options` applied, params) from a Hugging Face checkpoint directory.

    Biases that `options` add (`attention_bias`, `mlp_bias`) are zeros (`checkpoint.configure`).
    """
    directory = Path(directory)
    config, zeros = _configure(directory, options)
    named, unmatched = rename(
        read_safetensors(directory),
        config,
        "hf",
        lambda place, w: families.to_ours(place, w, out_in=place.module.kind == "linear"),
        prefix=families.family(config).hf_optional_prefix,
    )
    named.update(zeros)  # build_params empties it, freeing each host array once converted
    return config, build_params(named, unmatched, config, str(directory))
