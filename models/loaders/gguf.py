"""GGUF files (llama.cpp) of the families with GGUF names in models/families.py (Llama),
dequantised with the `gguf` package."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np

from models import families
from models.config import ModelConfig
from models.loaders.checkpoint import configure, rename
from models.loaders.lazy import LazyTensor


def field(reader: gguf.GGUFReader | Mapping[str, Any], key: str, default: Any = None) -> Any:
    """The decoded value of metadata `key` (str, number or list), or `default` when absent;
    `reader` may also be the metadata dict of `read_metadata`."""
    if isinstance(reader, Mapping):
        return reader.get(key, default)
    f = reader.fields.get(key)
    return default if f is None else f.contents()


# GGUF value types (gguf.GGUFValueType) -> struct format; 8 is a string, 9 an array
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


class TensorInfo(NamedTuple):
    """Where a GGUF tensor lies: its dims (GGUF's order, fastest first), ggml type, and
    the byte offset of its data from the start of the file."""

    dims: tuple[int, ...]
    ggml_type: int
    offset: int


def read_metadata(path: str | Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """(metadata {key: value}, {tensor name: TensorInfo}) of a GGUF file (version 2 or 3),
    values decoded as `GGUFReader`'s `contents()` decodes them. Reads only the header, in
    plain Python: a `GGUFReader` builds a numpy view of every array element (SmolLM2's 100k
    vocabulary strings: seconds), which a config does not need."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
        order = "<" if struct.unpack_from("<I", data, 4)[0] < 0x10000 else ">"
        version = struct.unpack_from(order + "I", data, 4)[0]
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3 are)")
        offset = 8

        def unpack(fmt: str) -> Any:
            nonlocal offset
            value = struct.unpack_from(order + fmt, data, offset)[0]
            offset += struct.calcsize(order + fmt)
            return value

        def string() -> str:
            nonlocal offset
            size = unpack("Q")
            offset += size
            return str(data[offset - size : offset], encoding="utf-8")

        def value(kind: int) -> Any:
            nonlocal offset
            if kind == _STRING:
                return string()
            if kind == _ARRAY:
                item, count = unpack("I"), unpack("Q")
                if item in _SCALARS:
                    fmt = f"{order}{count}{_SCALARS[item]}"
                    items = list(struct.unpack_from(fmt, data, offset))
                    offset += struct.calcsize(fmt)
                    return items
                return [value(item) for _ in range(count)]
            return unpack(_SCALARS[kind])

        n_tensors, n_fields = unpack("Q"), unpack("Q")
        metadata = {}
        for _ in range(n_fields):
            key = string()
            metadata[key] = value(unpack("I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = tuple(unpack("Q") for _ in range(unpack("I")))
            infos.append((name, dims, unpack("I"), unpack("Q")))  # type, offset in the data
        alignment = metadata.get("general.alignment", 32)
        data_start = -(-offset // alignment) * alignment  # the data follows, aligned
    return metadata, {
        name: TensorInfo(dims, kind, data_start + at) for name, dims, kind, at in infos
    }


def read_f32(path: str | Path, info: TensorInfo) -> np.ndarray:
    """The values of a float32 tensor (a small one: it is read whole), shaped like torch."""
    if info.ggml_type != gguf.GGMLQuantizationType.F32:
        raise ValueError(f"{path}: expected a float32 tensor, got ggml type {info.ggml_type}")
    count = int(np.prod(info.dims))
    values = np.fromfile(path, np.float32, count=count, offset=info.offset)
    return values.reshape(tuple(reversed(info.dims)))


def config_from_gguf(
    reader: gguf.GGUFReader | Mapping[str, Any],
    has_output: bool,
    tensor: Callable[[str], np.ndarray | None] = lambda name: None,
) -> ModelConfig:
    """ModelConfig from GGUF metadata and the small tensors that belong to the config
    (`tensor(name)`, None when the file lacks it: Llama 3.1's `rope_freqs`); the LM head is
    tied unless `has_output` (the file has the output head's tensor, `output.weight`)."""
    family = families.gguf_family(field(reader, "general.architecture"))
    return family.config_from_gguf(
        lambda key, default=None: field(reader, key, default), has_output, tensor
    )


def unpermute_rope_rows(w_OxI: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE -> Hugging Face rotate-half).

    llama.cpp stores rows of head h as (head_dim/2, 2) pairs; Hugging Face as (2, head_dim/2).
    Only the first axis moves: given the row numbers `np.arange(O)`, it returns which stored
    row each Hugging Face row is (how loading reads a block of rows without the rest).
    """
    O, *rest = w_OxI.shape
    return (
        w_OxI.reshape(num_heads, O // num_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w_OxI.shape)
    )


def _to_ours(config: ModelConfig, place: families.Place, w: LazyTensor) -> LazyTensor:
    """Our value of a parameter from (a view of) its dequantised tensor (every matrix (out,
    in)); llama.cpp's Q/K rows are put back in Hugging Face's order by indexing the view."""
    if place.module.rope_heads:
        rows = unpermute_rope_rows(np.arange(w.shape[0]), getattr(config, place.module.rope_heads))
        w = w[rows]
    return families.to_ours(place, w, out_in=True)


def dequantized(tensor: gguf.ReaderTensor) -> LazyTensor:
    """A float32 view of a GGUF tensor, shaped like torch ((out, in) for matrices). Quantised
    blocks run along the last axis, so a block of rows is dequantised from those rows alone."""
    shape = tuple(int(n) for n in reversed(tensor.shape))

    def read(indices: tuple[np.ndarray, ...]) -> np.ndarray:
        rows = tensor.data[np.ix_(*indices[:-1])] if len(indices) > 1 else tensor.data
        values = gguf.quants.dequantize(rows, tensor.tensor_type)
        return np.asarray(values, np.float32)[..., indices[-1]]

    return LazyTensor.of(shape, read)


def _has_output(reader: gguf.GGUFReader | Mapping[str, Any], names: Collection[str]) -> bool:
    """Whether the file has its family's output-head tensor (else the head is tied)."""
    family = families.gguf_family(field(reader, "general.architecture"))
    return any(f"{m.gguf}.weight" in names for m in family.modules if m.ours == "lm_head")


def _file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


def gguf_config(path: str | Path, **options: Any) -> ModelConfig:
    """The config `gguf_tensors` gives, from the file's header alone (`read_metadata`: the
    metadata and tensor names; no tensor data is read or dequantised)."""
    path = _file(path)
    metadata, infos = read_metadata(path)
    config, _ = configure(
        config_from_gguf(
            metadata,
            _has_output(metadata, infos),
            lambda name: read_f32(path, infos[name]) if name in infos else None,
        ),
        options,
        str(path),
    )
    return config


def gguf_tensors(
    path: str | Path, **options: Any
) -> tuple[ModelConfig, dict[str, LazyTensor], list[str], gguf.GGUFReader]:
    """(config with `options` applied, {our parameter name: view of its tensor}, names of the
    tensors that no parameter has, reader) of a GGUF file, for `checkpoint.build_params`; the
    reader carries the tokenizer metadata. No tensor is dequantised here. Biases that
    `options` add (`attention_bias`, `mlp_bias`) are zeros."""
    reader = gguf.GGUFReader(_file(path))
    tensors = {t.name: t for t in reader.tensors}
    config, zeros = configure(
        config_from_gguf(
            reader,
            _has_output(reader, tensors),
            lambda name: np.asarray(dequantized(tensors[name])) if name in tensors else None,
        ),
        options,
        str(path),
    )
    named, unmatched = rename(
        {t.name: dequantized(t) for t in reader.tensors},
        config,
        "gguf",
        lambda place, w: _to_ours(config, place, w),
    )
    return config, named | zeros, unmatched, reader
