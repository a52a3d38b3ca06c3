"""PEFT (Hugging Face) LoRA adapters <-> lora-jax adapter leaves: the file format only.

A PEFT 0.21 LoRA adapter is a directory of two files:

``adapter_config.json``
  ``peft_type: "LORA"``, ``r`` and ``lora_alpha`` (the defaults), ``rank_pattern`` and
  ``alpha_pattern`` (``{regex: value}``, a key matching a module name or a dotted
  suffix of it, first match wins), ``use_rslora`` (s = alpha/sqrt(r) instead of
  alpha/r), ``target_modules`` (module names or suffixes), ``fan_in_fan_out`` (true
  for GPT-2's ``Conv1D``, whose weight is stored (in, out)), ...
``adapter_model.safetensors``
  for a ``Linear`` or ``Conv1D`` module ``<m>``:
  ``base_model.model.<m>.lora_A.weight`` (r, fan_in) and ``.lora_B.weight`` (fan_out, r);
  for an ``Embedding``: ``base_model.model.<m>.lora_embedding_A`` (r, vocab) and
  ``.lora_embedding_B`` (dim, r) (no ``.weight``). Optionally
  ``base_model.model.<m>.base_layer.weight``, a copy of the base embedding.

PEFT's update of a torch weight (out, in) is s·B·A; ours of a Flax weight (in, out) is
s·A·B, so in both cases our factors are PEFT's transposed: A = lora_Aᵀ (fan_in, r),
B = lora_Bᵀ (r, fan_out), and for an embedding A = lora_embedding_Aᵀ (vocab, r),
B = lora_embedding_Bᵀ (r, dim). The layout of ``Conv1D`` factors is the same as for
``Linear``; ``fan_in_fan_out`` only tells PEFT how to merge them.

Which of our weights is which PyTorch module is a *module map*, a function
``(path, layer) -> HFModule | None`` (``path`` slash-joined, ``layer`` the index along
a stacked ``nn.scan`` axis, or None): `default_module_map` follows the
``layers_N/...`` <-> ``model.layers.N....`` convention, and a model family supplies
its own (``models.hf_names``). A fused module (GPT-2's ``c_attn`` = q, k, v) holds
several of our weights as blocks of its output: its lora_A is the concatenation of
theirs (rank = sum of ranks) and its lora_B is block-structured; reading one gives
every block the whole A, so the ranks grow but the update is exact.
"""

from __future__ import annotations

import collections
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from lora_jax import _config, _dora, _layout, _partition, _residual, _tree, fingerprint

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
KINDS = ("linear", "conv1d", "embedding")
BASE_HASH_KEY = "lora_jax.base_sha256"  # safetensors metadata: a hash of the adapted base weights
# How error messages tell the caller to skip the base-weight checks; a command line that
# spells it as a flag replaces this text in the message (train/export.py: --skip-base-check).
SKIP_BASE_CHECK = "pass check_base=False"

_MODULE_NAME = r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*"
_TENSOR_KEY = re.compile(
    rf"{re.escape(KEY_PREFIX)}(?P<module>{_MODULE_NAME})\."
    r"(?P<what>lora_A\.weight|lora_B\.weight|lora_embedding_A|"
    r"lora_embedding_B|base_layer\.weight|lora_magnitude_vector)"
)
# Config fields that change what an adapter computes and that this converter does not implement.
_UNSUPPORTED = (
    "lora_bias",
    "modules_to_save",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "velora_config",
    "kasa_config",
    "monteclora_config",
)


class PeftFormatError(ValueError):
    """A PEFT adapter that cannot be converted; the message names the key and the fix."""


class HFModule(NamedTuple):
    """Where one of our weights lives in the PyTorch (transformers) model.

    Attributes:
      name: the module's dotted name in the model PEFT wraps, e.g.
        ``"model.layers.0.self_attn.q_proj"``.
      kind: ``"linear"`` (``torch.nn.Linear``, weight (out, in)), ``"conv1d"``
        (transformers ``Conv1D``, weight (in, out)) or ``"embedding"``.
      part, parts: the weight is output block ``part`` of ``parts`` of a fused module
        (GPT-2's ``c_attn``: q, k, v are parts 0, 1, 2 of 3); (0, 1) otherwise.
    """

    name: str
    kind: str = "linear"
    part: int = 0
    parts: int = 1


ModuleMap = Callable[[str, int | None], HFModule | None]


def default_module_map(path: str, layer: int | None) -> HFModule:
    """``layers_3/self_attn/q_proj/kernel`` -> ``model.layers.3.self_attn.q_proj``.

    Segments ``name_N`` become ``name.N``; a stacked (scanned) weight's layer index
    follows its first segment (``layers/mlp/up_proj/kernel``, layer 3 ->
    ``model.layers.3.mlp.up_proj``); every name gets the prefix ``model.``. A leaf named
    ``embedding`` is an ``Embedding``, anything else a ``Linear``.
    """
    *modules, leaf = path.split("/")
    if layer is not None:
        modules[0] = f"{modules[0]}_{layer}"
    dotted = ".".join(re.sub(r"_(\d+)$", r".\1", m) for m in modules)
    return HFModule(f"model.{dotted}", "embedding" if leaf == "embedding" else "linear")


class _Site(NamedTuple):
    """One of our weights (one layer of a stacked one) as a block of a PyTorch module."""

    path: _tree.Path
    layer: int | None
    module: HFModule
    fan_in: int
    fan_out: int


def _sites(
    flat_base: Mapping, module_map: ModuleMap, layouts: Mapping[_tree.Path, _layout.Layout]
) -> dict[str, list[_Site]]:
    """{module name: its sites by part} for every matrix of the base tree the map names."""
    by_module: dict[str, list[_Site]] = collections.defaultdict(list)
    for path, leaf in flat_base.items():
        if not _layout.is_matrix(leaf):
            continue
        shape = _tree.value(leaf).shape
        lay = layouts.get(path) or _layout.resolve(None, path, flat_base)
        if lay.stack > 1:
            continue  # nested scans have no per-layer module name; refused if adapted
        fan_in, fan_out = _layout.fans(shape, lay)
        for layer in range(shape[0]) if lay.stack else [None]:
            module = module_map(_tree.path_str(path), layer)
            if module is not None:
                _check_module(module, path, layer)
                by_module[module.name].append(_Site(path, layer, module, fan_in, fan_out))
    for name, sites in by_module.items():
        sites.sort(key=lambda site: site.module.part)
        parts = [site.module.part for site in sites]
        if (
            len({site.module.kind for site in sites}) > 1
            or parts != list(range(len(parts)))
            or any(site.module.parts != len(sites) for site in sites)
        ):
            found = [(_tree.path_str(s.path), s.layer, s.module) for s in sites]
            raise PeftFormatError(
                f"the module map sends {found} to module {name!r}; a module gets one "
                "weight, or the parts 0..parts-1 of a fused one with one kind"
            )
    return by_module


def _check_module(module: HFModule, path: _tree.Path, layer: int | None) -> None:
    where = f"{_tree.path_str(path)}" + ("" if layer is None else f" (layer {layer})")
    if not isinstance(module, HFModule) or not re.fullmatch(_MODULE_NAME, module.name):
        raise PeftFormatError(
            f"the module map gives {module!r} for {where}; it must return an "
            "HFModule whose name is dotted identifiers (no '/', '..' or spaces)"
        )
    if module.kind not in KINDS or not 0 <= module.part < module.parts:
        raise PeftFormatError(
            f"the module map gives {module!r} for {where}; kind must be one of "
            f"{KINDS} and 0 <= part < parts"
        )


def _base_digest(flat_base: Mapping, sites: Mapping[str, list[_Site]], modules) -> str:
    """SHA-256 over a fixed sample of the base weights of `modules` (every part and layer)."""

    def weights():
        for name in sorted(modules):
            for site in sites[name]:
                w = np.asarray(_tree.value(flat_base[site.path]))
                yield f"{name}:{site.module.part}", (w if site.layer is None else w[site.layer])

    return fingerprint.sha256(weights())


def _tensor_keys(module: HFModule) -> tuple[str, str]:
    """The (A, B) tensor keys of a module in adapter_model.safetensors."""
    stem = KEY_PREFIX + module.name
    if module.kind == "embedding":
        return f"{stem}.lora_embedding_A", f"{stem}.lora_embedding_B"
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"


def _number(x: float) -> int | float:
    """An alpha as PEFT users write it: an int when float32 rounding is all that separates it."""
    return round(x) if abs(x - round(x)) <= 1e-5 * max(abs(x), 1.0) else x


# ----------------------------------------------------------------------------- export


def to_peft(
    directory: str | Path,
    params: Any,
    module_map: ModuleMap = default_module_map,
    *,
    use_rslora: bool = False,
    dropout: float = 0.0,
    tied: Mapping[str, str | None] | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    init: str | None = None,
) -> Path:
    """Writes the adapter of `params` as PEFT writes a LoRA adapter (module docstring).

    Args:
      directory: created if needed; gets ``adapter_config.json`` and
        ``adapter_model.safetensors`` (its metadata also holds a hash of the adapted base
        weights, which `from_peft` checks).
      params: an adapted tree (base weights and LoRA leaves, as `lj.init` makes).
      module_map: our weight path (and layer of a stacked weight) -> `HFModule`.
      use_rslora: write alphas for s = alpha/sqrt(r) (as the adapter was configured).
        Either way the scales are exact; this only picks how PEFT spells them.
      tied: ``{embedding module: the output module sharing its table}`` of a model with
        tied embeddings (``{"model.embed_tokens": "lm_head"}``), None for an output PEFT
        cannot tie. lora-jax adapts every use of a table, so an adapted tied embedding is
        written as PEFT's ``ensure_weight_tying`` writes it (the output module's
        lora_A/lora_B are the embedding's lora_embedding_B/A transposed), and refused
        where PEFT cannot tie it.
      dropout, base_model_name_or_path, task_type: copied into the config.
      init: the adapter's ``LoraConfig.init``. A PiSSA/OLoRA adapter applies to the residual
        base that `lj.init` returned, not the original one a PEFT adapter is loaded on, so
        it is refused: export ``lj.convert_to_lora(params, initial)`` instead.

    A module's r is the rank of its factors and its alpha = s·r (s·sqrt(r) with rsLoRA);
    the most common values become ``r``/``lora_alpha`` and the others go to
    ``rank_pattern``/``alpha_pattern``. A fused module's blocks with different scales
    have the ratio folded into lora_B.

    Returns:
      The directory.
    """
    if init in _residual.RESIDUAL_INITS:
        raise PeftFormatError(
            f"an init={init!r} adapter applies to the residual base W - s*A*B, not the "
            "original base PEFT loads it on; export lj.convert_to_lora(params, initial) "
            "(a rank-2r adapter of the original base) instead"
        )
    flat = _tree.flatten(params)
    deltas = [_tree.path_str(p) for p in flat if _tree.leaf_name(p).endswith(_tree.DELTA_SUFFIX)]
    if deltas:
        raise PeftFormatError(
            f"{deltas[0]}: PEFT adapters hold no bias deltas (its bias='all' saves "
            "whole biases); export a merged checkpoint instead, or train with "
            "bias='none'"
        )
    adapted = _tree.adapted_weights(flat)
    if not adapted:
        raise PeftFormatError("the tree holds no LoRA adapter; to_peft takes adapted params")
    base = {p: v for p, v in flat.items() if not _tree.is_lora_leaf(p)}
    factors, layouts = {}, {}
    for path in adapted:
        a, b, s, lay = _factors(flat, path)
        factors[path], layouts[path] = (a, b, s), lay
    sites = _sites(base, module_map, layouts)
    magnitudes = _magnitudes(flat, adapted, layouts)
    dora: dict[str, Any] = {}
    site_of = {(site.path, site.layer): site for group in sites.values() for site in group}

    blocks: dict[str, dict[int, tuple]] = collections.defaultdict(dict)
    for path, (a_SxIxR, b_SxRxO, s_S) in factors.items():
        for i, layer in enumerate(range(a_SxIxR.shape[0]) if layouts[path].stack else [None]):
            site = site_of.get((path, layer))
            if site is None:
                where = _tree.path_str(path) + ("" if layer is None else f" (layer {layer})")
                raise PeftFormatError(
                    f"{where} is adapted but the module map names no PyTorch module "
                    "for it; pass to_peft a module_map that does"
                )
            blocks[site.module.name][site.module.part] = (a_SxIxR[i], b_SxRxO[i], s_S[i])
            if path in magnitudes:
                dora[site.module.name] = _dora_vector(site, sites, magnitudes[path][i])

    tensors, ranks, alphas, kinds = {}, {}, {}, set()
    for name, parts in blocks.items():
        module = sites[name][0].module
        a_RxI, b_OxR, s = _fuse(sites[name], parts)
        key_a, key_b = _tensor_keys(module)
        tensors[key_a], tensors[key_b] = a_RxI, b_OxR
        if name in dora:
            tensors[KEY_PREFIX + name + "." + MAGNITUDE_KEY] = dora[name]
        ranks[name] = a_RxI.shape[0]
        alphas[name] = _number(s * (math.sqrt(ranks[name]) if use_rslora else ranks[name]))
        kinds.add(module.kind)
    tied_outputs = _tie(tensors, ranks, alphas, tied or {}, blocks)

    rank, alpha = _most_common(ranks), _most_common(alphas)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": _patterns(ranks, rank),
        "alpha_pattern": _patterns(alphas, alpha),
        "target_modules": _target_modules(set(blocks), set(sites)),
        "use_rslora": use_rslora,
        "lora_dropout": dropout,
        "bias": "none",
        "fan_in_fan_out": "conv1d" in kinds,
        "ensure_weight_tying": bool(tied_outputs),
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": bool(dora),
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "modules_to_save": None,
    }

    from safetensors.flax import save_file  # the [peft] extra; `import lora_jax` needs no more

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", BASE_HASH_KEY: _base_digest(base, sites, blocks)}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata=metadata)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


MAGNITUDE_KEY = "lora_magnitude_vector"


def _magnitudes(flat: Mapping, adapted: list, layouts: Mapping) -> dict:
    """{weight path: DoRA magnitudes (S, fan_out)} of the DoRA-adapted weights; PEFT's
    use_dora is one flag for the whole adapter, so all or none must have one."""
    found = {
        p: _tree.value(flat[_tree.lora_path(p, _tree.MAGNITUDE_SUFFIX)])
        for p in adapted
        if _tree.lora_path(p, _tree.MAGNITUDE_SUFFIX) in flat
    }
    if found and len(found) != len(adapted):
        plain = next(_tree.path_str(p) for p in adapted if p not in found)
        raise PeftFormatError(
            f"{plain} has no DoRA magnitude but other weights do; PEFT's use_dora holds for "
            "every module of an adapter: export the DoRA and the plain weights apart"
        )
    return {
        p: np.asarray(m, np.float32).reshape(
            -1, _layout.fans(_tree.value(flat[p]).shape, layouts[p])[1]
        )
        for p, m in found.items()
    }


def _dora_vector(site: _Site, sites: Mapping, m_O) -> Any:
    """A module's lora_magnitude_vector (fan_out,): one weight's m; a module fused from
    several weights has per-column norms PEFT computes over all of them, which this
    converter does not write."""
    if len(sites[site.module.name]) != 1:
        raise PeftFormatError(
            f"module {site.module.name!r} fuses several of our weights; a DoRA adapter on a "
            "fused module cannot be exported: merge it instead (lj.merge)"
        )
    return m_O


def _tie(
    tensors: dict, ranks: dict, alphas: dict, tied: Mapping[str, str | None], adapted
) -> list[str]:
    """Adds the tensors (and rank/alpha) of the outputs tied to adapted embeddings; their names."""
    outputs = []
    for embedding, output in tied.items():
        if embedding not in adapted:
            continue
        if output is None:
            raise PeftFormatError(
                f"module {embedding!r} is adapted and shares its table with the output "
                "layer, which PEFT cannot tie for this model: PEFT would adapt only "
                "the input side. Leave the embedding out of the LoRA targets"
            )
        key_a, key_b = _tensor_keys(HFModule(embedding, "embedding"))
        out_a, out_b = _tensor_keys(HFModule(output))
        tensors[out_a], tensors[out_b] = tensors[key_b].T, tensors[key_a].T
        ranks[output], alphas[output] = ranks[embedding], alphas[embedding]
        outputs.append(output)
    return outputs


def _factors(flat: Mapping, path: _tree.Path):
    """(A (S, fan_in, r), B (S, r, fan_out), s (S,), layout) of an adapted weight; S = 1 unstacked."""
    name = _tree.path_str(path)
    get = lambda suffix: _tree.value(flat[_tree.lora_path(path, suffix)])
    w, a, b, s = (
        _tree.value(flat[path]),
        get(_tree.A_SUFFIX),
        get(_tree.B_SUFFIX),
        get(_tree.SCALE_SUFFIX),
    )
    lay = _layout.check_fits(name, w.shape, a.shape, b.shape, s.shape)
    if lay.stack > 1:
        raise PeftFormatError(
            f"{name}: {lay.stack} stacked axes (nested scans) have no per-layer "
            "PyTorch module; unstack the tree first"
        )
    a_SxIxR, b_SxRxO, s_S = _layout.flatten_factors(a, b, s, lay)
    return a_SxIxR, b_SxRxO, np.asarray(s_S, np.float32), lay


def _fuse(sites: list[_Site], parts: Mapping[int, tuple]):
    """(lora_A (R, fan_in), lora_B (fan_out, R), s) of a module from its blocks' (A, B, s).

    lora_A stacks the blocks' Aᵀ (R = the sum of their ranks); lora_B holds each block's Bᵀ
    in its own rows and columns, zero elsewhere, times s_block/s with s the first block's.
    """
    scale = float(parts[min(parts)][2])
    a_list, b_list = [], []
    for part, (a_IxR, b_RxO, s) in sorted(parts.items()):
        rank = a_IxR.shape[-1]
        a_list.append(a_IxR.T)
        b_list.append(
            jnp.concatenate(
                [
                    b_RxO.T * (float(s) / scale)
                    if site.module.part == part
                    else jnp.zeros((site.fan_out, rank), b_RxO.dtype)
                    for site in sites
                ]
            )
        )
    return jnp.concatenate(a_list), jnp.concatenate(b_list, axis=1), scale


def _most_common(values: Mapping[str, Any]) -> Any:
    counts = collections.Counter(values.values())
    return max(counts, key=lambda v: (counts[v], v))


def _patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """The shortest PEFT pattern map that gives every module its value.

    A module whose value differs from `default` is keyed by its last name segment when
    every adapted module that segment matches has the same value, else by its full name.
    """
    patterns: dict[str, Any] = {}
    for name, value in sorted(values.items()):
        if value == default:
            continue
        short = name.rsplit(".", 1)[-1]
        same = all(v == value for m, v in values.items() if _config.pattern_matches(short, m, "."))
        patterns[short if same else name] = value
    return patterns


def _target_modules(adapted: set[str], known: set[str]) -> list[str]:
    """Last name segments when they select exactly the adapted modules, else full names."""
    short = {name.rsplit(".", 1)[-1] for name in adapted}
    selected = {m for m in known if m.rsplit(".", 1)[-1] in short}
    return sorted(short if selected == adapted else adapted)


# ----------------------------------------------------------------------------- import


def read_config(directory: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT LoRA adapter, checked for what `from_peft` needs.

    Raises:
      PeftFormatError: not LoRA, a missing ``r``/``lora_alpha`` (PEFT would silently use
        its defaults), or a feature that changes what the adapter computes (DoRA, bias,
        modules_to_save, ...).
    """
    file = Path(directory) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{directory} is not a PEFT adapter: {CONFIG_FILE} is missing")
    try:
        config = json.loads(file.read_text())
    except ValueError as e:
        raise PeftFormatError(f"{file} is not valid JSON ({e})") from None
    if config.get("peft_type") != "LORA":
        raise PeftFormatError(
            f"{file}: peft_type is {config.get('peft_type')!r}; only LoRA "
            "adapters (peft_type 'LORA') convert"
        )
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise PeftFormatError(
                f"{file}: {key!r} is missing (PEFT would silently use its default "
                f"{ {'r': 8, 'lora_alpha': 8}[key] }); add the value the adapter was "
                "trained with"
            )
    checks = {
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        **{f"rank_pattern[{k!r}]": v for k, v in (config.get("rank_pattern") or {}).items()},
        **{f"alpha_pattern[{k!r}]": v for k, v in (config.get("alpha_pattern") or {}).items()},
    }
    for key, value in checks.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise PeftFormatError(f"{file}: {key} is {value!r}; use a positive number")
    used = [key for key in _UNSUPPORTED if config.get(key)]
    if used or config.get("bias", "none") != "none":
        what = used[0] if used else f"bias={config['bias']!r}"
        raise PeftFormatError(
            f"{file}: {what} is set; lora-jax converts plain LoRA factors only "
            "(merge that adapter in PEFT and load the merged model instead)"
        )
    return config


def _read_tensors(directory: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import SafetensorError, safe_open  # the [peft] extra

    file = directory / WEIGHTS_FILE
    if not file.is_file():
        hint = (
            " (adapter_model.bin is a pickle and is never loaded; re-save the adapter with "
            "save_pretrained(..., safe_serialization=True))"
            if (directory / "adapter_model.bin").is_file()
            else ""
        )
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_FILE}{hint}")
    try:
        with safe_open(str(file), framework="flax") as reader:
            return {k: reader.get_tensor(k) for k in reader.keys()}, dict(reader.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise PeftFormatError(
            f"{file} cannot be read ({e}); it is truncated or not a safetensors "
            "file: copy or export it again"
        ) from None


def from_peft(
    directory: str | Path,
    params: Any,
    module_map: ModuleMap = default_module_map,
    *,
    tied: Mapping[str, str | None] | None = None,
    layout: Mapping[str, _layout.Layout] | None = None,
    check_base: bool = True,
    base_name: str | None = None,
) -> Any:
    """The base `params` with a PEFT LoRA adapter added as lora-jax leaves.

    Strict where PEFT is lenient: every tensor must belong to a module the map names and
    the config targets, no targeted module may lack a tensor, every shape must be the one
    the config and the base weight imply (r, fan_in) / (fan_out, r), and every factor must
    be finite; errors name the key (and, for an adapter that does not fit, the base it
    records and this one). Modules of a stacked weight that the adapter skips get zero
    factors; different ranks along a stack are padded with zero columns. Factors are
    float32 for low-precision weights.

    Args:
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors`` (a pickled
        ``adapter_model.bin`` is never read).
      params: the base tree (no LoRA leaves).
      module_map, tied: as for `to_peft`. An adapted tied embedding needs
        ``ensure_weight_tying`` (else PEFT leaves the output side unadapted, which lora-jax
        cannot express), and the tied output's tensors must be its transposed copies.
      layout: ``{path or regex: Layout}`` for weights the flattening rule reads wrongly.
      check_base: compare the base weights with what the adapter carries about its base (an
        embedding's ``base_layer.weight``, lora-jax's sampled hash); False skips that check,
        not the shape checks.
      base_name: what to call `params`' model in error messages (e.g. its path).

    Returns:
      The adapted tree (run it through `lj.apply`, or `lj.merge` it).
    """
    directory = Path(directory)
    config = read_config(directory)
    tensors, metadata = _read_tensors(directory)
    bases = _Bases(config.get("base_model_name_or_path"), base_name)
    flat = _tree.flatten(params)
    if any(_tree.is_lora_leaf(p) for p in flat):
        raise ValueError(
            "params already hold LoRA leaves; from_peft takes the base tree "
            "(lj.merge(params) folds an existing adapter in first)"
        )
    layouts = {p: _layout.resolve(layout, p, flat) for p in flat if _layout.is_matrix(flat[p])}
    sites = _sites(flat, module_map, layouts)
    kinds = {name: group[0].module.kind for name, group in sites.items()}
    outputs = {out: emb for emb, out in (tied or {}).items() if out is not None}
    found = _group_tensors(tensors, {**kinds, **{out: "linear" for out in outputs}}, bases)
    _untie(found, tied or {}, config)
    _check_targets(config, sites, found, bases)

    blocks: dict[_tree.Path, dict[int | None, tuple]] = collections.defaultdict(dict)
    for name, parts in found.items():
        module = sites[name][0].module
        rank = _config.pattern_value(config.get("rank_pattern"), config["r"], name, sep=".")
        alpha = _config.pattern_value(
            config.get("alpha_pattern"), config["lora_alpha"], name, sep="."
        )
        s = _config.scale(alpha, rank, config.get("use_rslora"))
        fan_in, fan_out = sites[name][0].fan_in, sum(site.fan_out for site in sites[name])
        key_a, key_b = _tensor_keys(module)
        a_RxI = _checked(key_a, parts["A"], (rank, fan_in), name, bases)
        b_OxR = _checked(key_b, parts["B"], (fan_out, rank), name, bases)
        if check_base and "base" in parts:
            _check_base_layer(name, parts["base"], flat, sites[name])
        m_O = _magnitude(parts, module, fan_out, config)
        start = 0
        for site in sites[name]:
            b_block_OxR = b_OxR[start : start + site.fan_out]
            start += site.fan_out
            m_block_O = None if m_O is None else m_O[start - site.fan_out : start]
            blocks[site.path][site.layer] = (a_RxI.T, b_block_OxR.T, s, m_block_O)

    if (
        check_base
        and BASE_HASH_KEY in metadata
        and _base_digest(flat, sites, found) != metadata[BASE_HASH_KEY]
    ):
        raise PeftFormatError(
            f"{directory}: the adapter was exported from a base with other weights "
            f"than {bases.this} (same shapes, different sampled values of the "
            f"adapted modules); load {bases.theirs}, or {SKIP_BASE_CHECK} to "
            "apply it anyway"
        )
    new = dict(flat)
    for path, layers in blocks.items():
        new.update(_leaves(path, flat[path], layouts[path], layers))
    _partition.check_adapter_fits(new)
    return _tree.unflatten_like(params, new)


class _Bases(NamedTuple):
    """Names for error messages: the base an adapter records, and the one given."""

    recorded: str | None  # adapter_config.json's base_model_name_or_path
    given: str | None

    @property
    def this(self) -> str:
        return f"this base {self.given!r}" if self.given else "this base"

    @property
    def theirs(self) -> str:
        return (
            f"the base it was made for ({self.recorded})"
            if self.recorded
            else "the base it was made for"
        )

    def mismatch(self) -> str:
        """'the adapter does not fit <this base>' (+ the one it records)."""
        made = f" (it records base_model_name_or_path {self.recorded!r})" if self.recorded else ""
        return f"the adapter does not fit {self.this}{made}"


def _group_tensors(
    tensors: Mapping[str, Any], kinds: Mapping[str, str], bases: _Bases = _Bases(None, None)
) -> dict[str, dict]:
    """{module: {"A", "B", optionally "base"}} from the tensor keys, given {module: kind} of the
    modules that may appear; unexpected keys raise."""
    found: dict[str, dict] = collections.defaultdict(dict)
    for key, array in tensors.items():
        match = _TENSOR_KEY.fullmatch(key)
        if match is None:
            raise PeftFormatError(
                f"unexpected key {key!r} in {WEIGHTS_FILE}: expected "
                f"{KEY_PREFIX}<module>.lora_A.weight / .lora_B.weight / "
                ".lora_embedding_A / .lora_embedding_B (plain LoRA, adapter name "
                "removed as save_pretrained does)"
            )
        name, what = match["module"], match["what"]
        if name not in kinds:
            raise PeftFormatError(
                f"unexpected key {key!r}: no weight of {bases.this} maps to module "
                f"{name!r}; {bases.mismatch()}: load {bases.theirs}, or (calling "
                "from_peft) give a module map (or tied) that names it"
            )
        if what in ("base_layer.weight", MAGNITUDE_KEY):
            found[name]["base" if what == "base_layer.weight" else "M"] = array
            continue
        if what.startswith("lora_embedding") != (kinds[name] == "embedding"):
            raise PeftFormatError(
                f"unexpected key {key!r}: module {name!r} is a {kinds[name]} here"
            )
        found[name]["A" if what.endswith(("A", "A.weight")) else "B"] = array
    for name, parts in found.items():
        for part, key in zip("AB", _tensor_keys(HFModule(name, kinds[name]))):
            if part not in parts:
                raise PeftFormatError(
                    f"missing tensor {key!r} in {WEIGHTS_FILE}; the file is incomplete"
                )
    return found


def _untie(found: dict, tied: Mapping[str, str | None], config: Mapping) -> None:
    """Checks adapted tied embeddings and drops their outputs' tensors (copies of theirs)."""
    for embedding, output in tied.items():
        if embedding in found and (output is None or not config.get("ensure_weight_tying")):
            raise PeftFormatError(
                f"module {embedding!r} is adapted and tied to the output layer, but "
                "in PEFT its adapter leaves the output side unadapted "
                "(ensure_weight_tying is not set, or PEFT cannot tie this model); "
                "lora-jax applies an embedding adapter to every use of the table"
            )
        if output in found:
            copy = found.pop(output)
            if embedding not in found:
                raise PeftFormatError(
                    f"unexpected key {_tensor_keys(HFModule(output))[0]!r}: {output!r} "
                    f"shares the table of {embedding!r}, which the adapter does not adapt"
                )
            for key, mine, theirs in zip(
                _tensor_keys(HFModule(output)),
                (copy["A"], copy["B"]),
                (found[embedding]["B"].T, found[embedding]["A"].T),
            ):
                if mine.shape != theirs.shape or not np.array_equal(
                    np.asarray(mine), np.asarray(theirs)
                ):
                    raise PeftFormatError(
                        f"{key}: not the transposed copy of {embedding!r}'s adapter, "
                        "though the two modules share one table"
                    )


def _targeted(targets: str | Sequence[str], name: str) -> bool:
    """PEFT's target_modules rule: a regex matching the whole name, or a list of names and
    dotted suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def _layer(name: str) -> int | None:
    """The layer index in a module name (``model.layers.3.mlp.up_proj`` -> 3), or None."""
    match = re.search(r"\.(\d+)\.", name)
    return None if match is None else int(match[1])


def _check_targets(
    config: Mapping,
    sites: Mapping[str, list[_Site]],
    found: Mapping,
    bases: _Bases = _Bases(None, None),
) -> None:
    """Every module with tensors must be one the config targets (PEFT ignores the others), and
    every module the config targets (among those the map names) must have tensors."""
    targets = config.get("target_modules")
    if not targets or targets == "all-linear":
        return  # PEFT's other selection rules: the tensors themselves say what is adapted
    for name in sorted(found):
        if not _targeted(targets, name):
            key = _tensor_keys(sites[name][0].module)[0]
            raise PeftFormatError(
                f"tensor {key!r} adapts module {name!r}, which target_modules "
                f"{targets} does not select: PEFT would ignore it. Remove that "
                "module's tensors from the file, or add it to target_modules"
            )
    if config.get("layers_to_transform") is not None or config.get("exclude_modules"):
        return  # fewer modules than target_modules selects may be adapted
    missing = sorted(
        (name for name in sites if _targeted(targets, name) and name not in found),
        key=lambda name: (_layer(name) or 0, name),
    )
    if not missing:
        return
    key = _tensor_keys(sites[missing[0]][0].module)[0]
    found_layers = [layer for layer in map(_layer, found) if layer is not None]
    missing_layers = [_layer(name) for name in missing]
    if found_layers and None not in missing_layers and min(missing_layers) > max(found_layers):
        raise PeftFormatError(
            f"{bases.mismatch()}: it adapts layers 0-{max(found_layers)} but "
            f"target_modules {targets} selects {len(missing)} modules of later "
            f"layers of this base (first: {missing[0]!r}, no tensor {key!r}); load "
            f"{bases.theirs}"
        )
    raise PeftFormatError(
        f"missing tensor {key!r} in {WEIGHTS_FILE}: target_modules {targets} "
        f"selects module {missing[0]!r} of {bases.this}"
        + (f" ({len(missing)} such modules)" if len(missing) > 1 else "")
        + f"; the file is incomplete (export it again), or {bases.mismatch()}"
    )


def _checked(
    key: str, array, shape: tuple[int, int], module: str, bases: _Bases = _Bases(None, None)
):
    """`array` if it has `shape` and only finite values; else PeftFormatError naming `key`."""
    if tuple(array.shape) != shape:
        hint = (
            "it is transposed; PEFT stores lora_A (r, fan_in) and lora_B (fan_out, r)"
            if tuple(array.shape) == shape[::-1]
            else f"{bases.mismatch()} (another base model), or its r/rank_pattern is wrong"
        )
        raise PeftFormatError(
            f"{key}: shape {tuple(array.shape)}, but module {module!r} of "
            f"{bases.this} with its configured rank needs {shape}; {hint}"
        )
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(np.asarray(array))))
    if bad:
        raise PeftFormatError(
            f"{key}: {bad} of {np.size(array)} values are NaN or infinite; the "
            "adapter is damaged (or was saved from a diverged training run): "
            "export it again from a good checkpoint"
        )
    return array


def _check_base_layer(name: str, saved, flat: Mapping, sites: list[_Site]) -> None:
    """PEFT saves embeddings' base weights beside their adapters; they must be ours."""
    site = sites[0]
    w = np.asarray(_tree.value(flat[site.path]), np.float32)
    w = w if site.layer is None else w[site.layer]
    w = w.reshape(site.fan_in, site.fan_out)
    expected = w.T if site.module.kind == "linear" else w
    saved = np.asarray(saved, np.float32)
    if saved.shape != expected.shape or not np.allclose(
        saved, expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max()
    ):
        raise PeftFormatError(
            f"{KEY_PREFIX}{name}.base_layer.weight differs from the base weight "
            f"{_tree.path_str(site.path)} (shape {saved.shape} vs "
            f"{expected.shape}): the adapter was trained on another base (or with "
            f"a resized vocabulary); {SKIP_BASE_CHECK} to ignore it"
        )


def _magnitude(parts: Mapping, module: HFModule, fan_out: int, config: Mapping):
    """The DoRA magnitude (fan_out,) of a module read from PEFT, or None without use_dora.
    Each entry is one output column's, so a fused module's splits like its lora_B."""
    key = KEY_PREFIX + module.name + "." + MAGNITUDE_KEY
    if not config.get("use_dora"):
        if "M" in parts:
            raise PeftFormatError(f"unexpected key {key!r}: the config has use_dora false")
        return None
    if "M" not in parts:
        raise PeftFormatError(
            f"missing tensor {key!r} in {WEIGHTS_FILE}: use_dora is set, so every module "
            "needs its DoRA magnitude; the file is incomplete"
        )
    return np.asarray(_checked(key, parts["M"], (fan_out,), module.name), np.float32)


def _leaves(path: _tree.Path, leaf, lay: _layout.Layout, layers: Mapping[int | None, tuple]):
    """{leaf path: leaf} of A (*stack, *in, r), B (*stack, r, *out), s (*stack,) for one weight
    from its per-layer (A (fan_in, r), B (r, fan_out), s); the layer is None when unstacked.

    Layers the adapter skips get zero factors; lower ranks are padded with zero columns.
    With DoRA magnitudes m (fan_out,) (the fourth entry, else None) the weight also gets
    m (*stack, *out); a skipped layer's is ‖W‖_col, which leaves it unchanged.
    """
    w = _tree.value(leaf)
    fan_in, fan_out = _layout.fans(w.shape, lay)
    rank = max(a.shape[-1] for a, *_ in layers.values())
    fill = next(iter(layers.values()))[2]
    skipped = (jnp.zeros((fan_in, rank)), jnp.zeros((rank, fan_out)), fill, None)
    a_list, b_list, s_list, m_list = [], [], [], []
    for layer in [None] if None in layers else range(w.shape[0]):
        a_IxR, b_RxO, s, m_O = layers.get(layer, skipped)
        m_list.append(m_O)
        pad = rank - a_IxR.shape[-1]
        a_list.append(jnp.pad(a_IxR, ((0, 0), (0, pad))))
        b_list.append(jnp.pad(b_RxO, ((0, pad), (0, 0))))
        s_list.append(s)
    a, b, s = _layout.unflatten_factors(
        jnp.stack(a_list), jnp.stack(b_list), jnp.asarray(s_list, jnp.float32), w.shape, lay
    )
    dtype = _layout.factor_dtype(w.dtype)
    out = {
        _tree.lora_path(path, _tree.A_SUFFIX): _tree.new_leaf_like(leaf, a.astype(dtype)),
        _tree.lora_path(path, _tree.B_SUFFIX): _tree.new_leaf_like(leaf, b.astype(dtype)),
        _tree.lora_path(path, _tree.SCALE_SUFFIX): _tree.new_leaf_like(leaf, s),
    }
    if any(m is not None for m in m_list):
        w_norm = _dora.weight_norm(w, lay).reshape(-1, fan_out)
        m_shape = w.shape[: lay.stack] + w.shape[lay.stack + lay.fan_in :]
        m = jnp.stack([w_norm[i] if m is None else jnp.asarray(m) for i, m in enumerate(m_list)])
        m = m.astype(dtype).reshape(m_shape)
        out[_tree.lora_path(path, _tree.MAGNITUDE_SUFFIX)] = _tree.new_leaf_like(leaf, m)
    return out
