"""Params -> a Hugging Face checkpoint directory that
``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads (any family of
models/families.py: GPT-2, Llama).

The inverse of ``models.load(DIR)``: ``config.json``, ``model.safetensors`` (torch layouts:
Linear weights (out, in), GPT-2 Conv1D weights (in, out) with q/k/v fused into ``c_attn``)
and, given a tokenizer, ``tokenizer.json`` + ``tokenizer_config.json``; every file mode 0644.

``model.safetensors`` is written one tensor at a time, each computed just before it is
written; with ``merge=True`` an adapted tree (LoRA leaves beside their weights) is merged
layer by layer (``lj.merge`` of one module's layer alone) on the way, so a merged export
never holds a second full copy of the weights.
"""

from __future__ import annotations

import collections
import json
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tokenizers import Tokenizer

import lora_jax as lj
from models import families
from models.config import ModelConfig

WEIGHTS_FILE = "model.safetensors"
FILE_MODE = 0o644  # readable by every user of a shared model directory
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


class HFTensor(NamedTuple):
    """One transformers tensor: its shape and dtype, and how to compute it (on demand)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    value: Callable[[], np.ndarray]


_LORA_LEAF = re.compile(r"_lora_(a|b|scale|delta|magnitude)$")  # lora_jax's leaf names


def _modules(params: Any) -> dict[tuple[str, ...], dict[str, Any]]:
    """{module path: {leaf name: array}} of a (possibly adapted) params tree."""
    modules: dict[tuple[str, ...], dict[str, Any]] = collections.defaultdict(dict)
    for keys, array in traverse_util.flatten_dict(params).items():
        modules[keys[:-1]][keys[-1]] = array
    return modules


def hf_tensors(config: ModelConfig, params: Any, *, merge: bool = False) -> dict[str, HFTensor]:
    """{transformers tensor name: HFTensor} of `params`, scanned (``layers/...`` with a
    leading layer axis) or not. Nothing is computed here.

    `params` are merged, or with ``merge=True`` may hold LoRA leaves: each weight's are merged
    into it (one layer at a time) when its tensor is computed; refused otherwise."""
    blocks: dict[str, dict[int, _Block]] = collections.defaultdict(dict)
    for module_path, leaves in _modules(params).items():
        stacked = config.scan_layers and module_path[0] == "layers"
        for leaf, array in leaves.items():
            if merge and _LORA_LEAF.search(leaf):
                continue  # merged into its weight
            path = "/".join((*module_path, leaf))
            for layer in range(array.shape[0]) if stacked else [None]:
                place = families.locate(config, path, layer) if leaf in families.LEAVES else None
                if place is None:
                    raise ValueError(
                        f"parameter {path!r} has no Hugging Face name; export merged params "
                        "(lj.merge(params), or merge=True) of a models.Decoder"
                    )
                spec = array if layer is None else array[0]
                block = _Block(leaves, leaf, layer, place, spec.shape, np.dtype(spec.dtype))
                blocks[place.tensor("hf")][place.module.part] = block
    return {name: _tensor(parts) for name, parts in blocks.items()}


class _Block(NamedTuple):
    """One of our parameters (one layer of a stacked one) as a block of a transformers tensor."""

    leaves: Mapping[str, Any]  # its module's leaves, LoRA leaves included
    leaf: str
    layer: int | None
    place: families.Place
    shape: tuple[int, ...]
    dtype: np.dtype

    def value(self) -> Any:
        """The parameter, its adapter (if any) merged: lj.merge of this module (layer) alone."""
        leaves = self.leaves
        if self.layer is not None:
            leaves = {k: v[self.layer] for k, v in leaves.items()}
        if any(_LORA_LEAF.search(k) for k in leaves):
            leaves = lj.merge(dict(leaves))
        return leaves[self.leaf]


def _tensor(parts: Mapping[int, _Block]) -> HFTensor:
    """The tensor of a module's blocks, concatenated in order along the last axis."""
    blocks = [parts[i] for i in sorted(parts)]
    place = blocks[0].place
    shape = (*blocks[0].shape[:-1], sum(b.shape[-1] for b in blocks))
    spec = jax.eval_shape(
        lambda x: families.to_hf(place, x), jax.ShapeDtypeStruct(shape, blocks[0].dtype)
    )

    def value() -> np.ndarray:
        arrays = [b.value() for b in blocks]
        joined = arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis=-1)
        return np.asarray(families.to_hf(place, joined))

    return HFTensor(tuple(spec.shape), np.dtype(spec.dtype), value)


def hf_state_dict(config: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """{transformers tensor name: array in torch layout} of merged `params` (all computed)."""
    return {name: t.value() for name, t in hf_tensors(config, params).items()}


def write_safetensors(
    file: Path, tensors: Mapping[str, HFTensor], metadata: Mapping[str, str]
) -> None:
    """A safetensors file written tensor by tensor (each computed just before it is written)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        size = int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype.name],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name in sorted(tensors):
            array = np.ascontiguousarray(tensors[name].value(), tensors[name].dtype)
            out.write(array.tobytes())
            del array


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


def _written(directory: Path) -> Iterator[Path]:
    names = ("config.json", WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json")
    return (directory / n for n in names if (directory / n).is_file())


def save_hf(
    directory: str | Path,
    config: ModelConfig,
    params: Any,
    tokenizer: Tokenizer | None = None,
    *,
    merge: bool = False,
) -> Path:
    """Write `params` (in `config.param_dtype`; merged, or with ``merge=True`` adapted and
    merged on the way, tensor by tensor) as a transformers checkpoint directory.

    Returns the directory; ``models.load(directory)`` reads it back.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(config, params, merge=merge)
    (directory / "config.json").write_text(json.dumps(families.hf_config(config), indent=2) + "\n")
    write_safetensors(directory / WEIGHTS_FILE, tensors, {"format": "pt"})
    if tokenizer is not None:
        save_tokenizer(directory, tokenizer, config)
    for file in _written(directory):
        os.chmod(file, FILE_MODE)
    return directory
