"""A LoRA-adapted ``models.Decoder`` tree -> a llama.cpp LoRA adapter file (GGUF).

llama.cpp (``src/llama-adapter.cpp``, ``convert_lora_to_gguf.py``) reads an adapter as a GGUF
file with ``general.type = "adapter"``, ``general.architecture`` the base model's,
``adapter.type = "lora"``, one float ``adapter.lora.alpha``, and per adapted base tensor
``<name>.weight`` two tensors, in numpy (row-major) shapes:

* a matrix W (out, in): ``<name>.weight.lora_a`` (r, in) and ``.lora_b`` (out, r), and it adds
  (alpha/r)·B·A·x — PEFT's lora_A / lora_B;
* ``token_embd.weight`` (vocab, dim): ``.lora_a`` (vocab, r) and ``.lora_b`` (dim, r); the
  row of A for each token goes through B.

Ours are A (in, r), B (r, out) with a scale s per weight (and per layer of a scanned one), so
lora_a = Aᵀ and lora_b = (f·B)ᵀ. llama.cpp's scale comes from the one global alpha and each
tensor's rank, alpha/r; ``f = s / fl32(alpha/r)`` folds the difference into B, so rsLoRA,
rank and alpha patterns apply exactly. Alpha is the most common s·r, for which f = 1 (B as
trained). Llama's Q/K rows are permuted in GGUF files for llama.cpp's RoPE
(``loaders.gguf.unpermute_rope_rows``); their B is permuted the same way.

Factors are written as float32 (``convert_lora_to_gguf.py``'s default).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np

import lora_jax as lj
from models import families
from models.config import ModelConfig
from models.loaders.gguf import unpermute_rope_rows

_A, _B, _SCALE = "_lora_a", "_lora_b", "_lora_scale"
_UNSUPPORTED = ("_lora_delta", "_lora_magnitude")  # bias deltas, DoRA magnitudes


class GGUFExportError(ValueError):
    """An adapter llama.cpp cannot apply as it is; the message names the weight and the fix."""


class LoraTensor(NamedTuple):
    """One adapted GGUF tensor: its name, factors in llama.cpp's layout, and our scale s."""

    name: str  # the base tensor, "blk.3.attn_q.weight"
    a: np.ndarray  # lora_a: (r, in), or (vocab, r) for token_embd
    b: np.ndarray  # lora_b: (out, r), or (dim, r) for token_embd; not yet scaled
    scale: float  # s of lora-jax: the update is s·(B·A)


def lora_tensors(config: ModelConfig, params: Any) -> list[LoraTensor]:
    """The LoRA factors of an adapted ``models.Decoder`` tree (scanned or not), per GGUF tensor.

    Raises GGUFExportError for what llama.cpp cannot apply: bias deltas, DoRA, a family
    without GGUF names, a fused module, an adapted embedding whose table is also the output.
    """
    if families.family(config).config_from_gguf is None:
        raise GGUFExportError(
            f"{config.family} models have no GGUF tensor names here; export a PEFT adapter "
            "(lora-jax export --format peft) or a merged checkpoint (lora-jax merge)"
        )
    flat = lj.flatten_paths(params)
    for path in flat:
        if path.endswith(_UNSUPPORTED):
            raise GGUFExportError(
                f"{path}: llama.cpp adapters hold only LoRA factors (no bias deltas or DoRA "
                "magnitudes); export a merged checkpoint instead (lora-jax merge)"
            )
    tensors = []
    for key in flat:
        if not key.endswith(_A):
            continue
        weight = key[: -len(_A)]
        a, b = np.asarray(flat[key], np.float32), np.asarray(flat[weight + _B], np.float32)
        s = np.asarray(flat[weight + _SCALE], np.float32)
        stacked = config.scan_layers and weight.startswith("layers/")
        layers = range(a.shape[0]) if stacked else [None]
        for layer in layers:
            pick = (lambda x: x[layer]) if stacked else (lambda x: x)
            tensors.append(_tensor(config, weight, layer, pick(a), pick(b), float(pick(s))))
    return tensors


def _tensor(
    config: ModelConfig, weight: str, layer: int | None, a_IxR, b_RxO, scale: float
) -> LoraTensor:
    where = weight + ("" if layer is None else f" (layer {layer})")
    place = families.locate(config, weight, layer)
    if place is None or place.gguf is None or place.module.parts > 1:
        raise GGUFExportError(
            f"{where} has no single GGUF tensor to adapt; leave it out of the LoRA targets"
        )
    a_IxR, b_RxO = a_IxR.reshape(-1, a_IxR.shape[-1]), b_RxO.reshape(b_RxO.shape[0], -1)
    if place.module.kind == "embedding":
        if config.tie_word_embeddings:
            raise GGUFExportError(
                f"{where} is adapted and is also the output layer (tied embeddings); "
                "llama.cpp applies a token_embd adapter to the input side only. Leave the "
                "embedding out of the LoRA targets, or export with lora-jax merge"
            )
        return LoraTensor(place.tensor("gguf"), a_IxR, b_RxO.T, scale)
    b_OxR = b_RxO.T
    if place.module.rope_heads:
        hf_rows = unpermute_rope_rows(
            np.arange(b_OxR.shape[0]), getattr(config, place.module.rope_heads)
        )
        b_OxR = b_OxR[np.argsort(hf_rows)]  # GGUF row j holds Hugging Face row hf_rows[j]
    return LoraTensor(place.tensor("gguf"), a_IxR.T, b_OxR, scale)


def global_alpha(tensors: list[LoraTensor]) -> float:
    """llama.cpp's one alpha: the most common s·r (for which no B needs rescaling); 1 if that
    is 0 (llama.cpp reads alpha 0 as "scale 1")."""
    counts = collections.Counter(np.float32(t.scale * _rank(t)) for t in tensors)
    alpha = float(max(counts, key=lambda v: (counts[v], v)))
    return alpha if alpha != 0 else 1.0


def _rank(t: LoraTensor) -> int:
    return t.b.shape[1]


def applied_scale(alpha: float, rank: int) -> np.float32:
    """The scale llama.cpp applies to a rank-`rank` tensor of an adapter with `alpha`
    (``llama_adapter_lora_weight::get_scale`` at adapter scale 1: float32 alpha/rank)."""
    return np.float32(np.float32(alpha) / np.float32(rank))


def folded(tensors: list[LoraTensor], alpha: float) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF tensor name, float32 array) of each ``.lora_a`` / ``.lora_b``, with B times
    s / (alpha/r) so that llama.cpp's alpha/r gives each tensor its own s."""
    for t in tensors:
        factor = np.float64(t.scale) / np.float64(applied_scale(alpha, _rank(t)))
        yield f"{t.name}.lora_a", np.ascontiguousarray(t.a, np.float32)
        yield f"{t.name}.lora_b", np.ascontiguousarray(t.b * factor, np.float32)


def save_gguf_adapter(
    path: str | Path,
    config: ModelConfig,
    params: Any,
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the adapter of `params` as a llama.cpp LoRA adapter file at `path`.

    ``metadata``: further string keys for the file's header (``lora_jax.*`` provenance).
    Loads with ``llama_cpp.Llama(model_path=<base .gguf>, lora_path=path)``, or
    ``llama-cli -m <base .gguf> --lora path``. Returns `path`.
    """
    tensors = lora_tensors(config, params)
    if not tensors:
        raise GGUFExportError("the tree holds no LoRA adapter; export adapted params")
    alpha = global_alpha(tensors)
    writer = gguf.GGUFWriter(str(path), arch=config.family)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    for name, array in folded(tensors, alpha):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
