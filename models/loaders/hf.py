"""Hugging Face checkpoints (config.json + *.safetensors) of the families in models/families.py."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from models import families
from models.config import ModelConfig
from models.families import UnsupportedArchitectureError
from models.loaders.checkpoint import configure, rename
from models.loaders.lazy import LazyTensor, bounds, select

SUPPORTED_MODEL_TYPES = tuple(families.FAMILIES)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedArchitectureError",
    "config_from_hf",
    "hf_config",
    "hf_tensors",
    "safetensors_tensors",
]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (a model_type of models/families.py)."""
    return families.hf_family(hf).config_from_hf(hf)


def safetensors_tensors(directory: Path) -> dict[str, LazyTensor]:
    """Every tensor of every *.safetensors file in `directory`, as a view that reads (only) the
    blocks asked of it from its file (bfloat16 stays bfloat16). Only the files' headers are
    read here."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors file in {directory} (pickle-based .bin/.pt checkpoints are not "
            "loaded; convert them with save_pretrained(..., safe_serialization=True))"
        )
    tensors = {}
    for f in files:
        with safe_open(f, framework="numpy") as reader:
            for name in reader.keys():
                shape = reader.get_slice(name).get_shape()
                tensors[name] = LazyTensor.of(shape, functools.partial(_read, f, name))
    return tensors


def _read(file: Path, name: str, indices: tuple[np.ndarray, ...]) -> np.ndarray:
    """The block of tensor `name` at the outer product of `indices`: the smallest box that
    holds them is read, and the file closed again, so that the pages it maps are not kept."""
    box = bounds(indices)
    with safe_open(file, framework="numpy") as reader:
        block = reader.get_slice(name)[box]
    return select(block, [b.start for b in box], indices)


def _configure(
    directory: Path, options: dict[str, Any]
) -> tuple[ModelConfig, dict[str, LazyTensor]]:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; is it a Hugging Face checkpoint?")
    return configure(config_from_hf(json.loads(config_file.read_text())), options, str(directory))


def hf_config(directory: str | Path, **options: Any) -> ModelConfig:
    """The config `hf_tensors` gives, from config.json alone: no tensor is read."""
    return _configure(Path(directory), options)[0]


def hf_tensors(
    directory: str | Path, **options: Any
) -> tuple[ModelConfig, dict[str, LazyTensor], list[str]]:
    """(config with `options` applied, {our parameter name: view of its tensor}, names of the
    checkpoint tensors that no parameter has) of a Hugging Face checkpoint directory, for
    `checkpoint.build_params`. Reads config.json and the files' headers only.

    Biases that `options` add (`attention_bias`, `mlp_bias`) are zeros (`checkpoint.configure`).
    """
    directory = Path(directory)
    config, zeros = _configure(directory, options)
    named, unmatched = rename(
        safetensors_tensors(directory),
        config,
        "hf",
        lambda place, w: families.to_ours(place, w, out_in=place.module.kind == "linear"),
        prefix=families.family(config).hf_optional_prefix,
    )
    return config, named | zeros, unmatched
