"""One table per model family: our parameter paths <-> Hugging Face (transformers) module
names <-> GGUF (llama.cpp) tensor names, and the family's config mappings.

Every format reads its names here, in both directions: loading safetensors
(loaders/hf.py) and GGUF (loaders/gguf.py), exporting transformers checkpoints
(hf_export.py) and PEFT adapters (hf_names.py). Adding a family is a `Family`
(its `Module` table and config functions) in `FAMILIES`.

A module's parameters and its checkpoint tensors pair up by leaf: ``kernel``, ``embedding``
and ``scale`` are ``<name>.weight``, ``bias`` is ``<name>.bias``. Our kernels are (in, out);
a checkpoint stores a ``linear`` weight (out, in) (torch ``nn.Linear``; GGUF stores every
matrix so) and a ``conv1d`` one (in, out) (transformers ``Conv1D``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from models.config import ModelConfig, RopeScaling
from models.layers import rope_frequencies

LEAVES = ("kernel", "embedding", "scale", "bias")  # the parameter names of a models.Decoder


class UnsupportedArchitectureError(ValueError):
    """A checkpoint whose architecture (or an option of it) this decoder does not implement."""


class Module(NamedTuple):
    """One row of a family's table; "{i}" in a name stands for the layer index.

    kind: "linear", "conv1d", "embedding" or "norm" (stored as it is; LoRA never adapts it).
    part, parts: the module is output block `part` of `parts` of a fused checkpoint module
      (GPT-2's ``c_attn`` holds q, k, v as parts 0, 1, 2 of 3).
    rope_heads: the config field counting this projection's heads, whose rows llama.cpp
      permutes for its interleaved RoPE (GGUF only).
    """

    ours: str
    hf: str
    kind: str
    gguf: str | None = None
    part: int = 0
    parts: int = 1
    rope_heads: str | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    """A decoder family; `name` is its ModelConfig.family, transformers model_type and GGUF
    general.architecture.

    config_from_hf: ModelConfig from a transformers config.json dict.
    config_to_hf: the family's part of a config.json (`hf_config` adds the common fields).
    config_from_gguf: (metadata getter `get(key, default)`, has an output tensor, getter of
      a small tensor's values `tensor(name)` (None when absent)) -> ModelConfig; None when
      the family has no GGUF names.
    gguf_config_tensors: GGUF tensors that are part of the config, not parameters (read by
      `config_from_gguf`, skipped when loading).
    hf_buffers: transformers tensors that are not parameters (skipped when loading).
    hf_optional_prefix: a prefix of transformers names that some checkpoints leave out.
    peft_ties_head: whether PEFT ties an embedding adapter to the output module.
    """

    name: str
    modules: tuple[Module, ...]
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    config_from_gguf: (
        Callable[[Callable[..., Any], bool, Callable[[str], Any]], ModelConfig] | None
    ) = None
    gguf_config_tensors: tuple[str, ...] = ()
    hf_buffers: tuple[str, ...] = ()
    hf_optional_prefix: str = ""
    peft_ties_head: bool = True


def _reject(condition: bool, what: str) -> None:
    if condition:
        raise UnsupportedArchitectureError(f"unsupported checkpoint option: {what}")


def _first(token_id: int | list[int] | None) -> int | None:
    return token_id[0] if isinstance(token_id, list) else token_id


# ----------------------------------------------------------------------------------- GPT-2


def _gpt2_from_hf(hf: dict[str, Any]) -> ModelConfig:
    _reject(
        hf.get("activation_function", "gelu_new") != "gelu_new",
        "GPT-2 activation other than gelu_new",
    )
    _reject(hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx")
    hidden, heads = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        family="gpt2",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        num_layers=hf["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=hf["n_positions"],
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def _gpt2_to_hf(config: ModelConfig) -> dict[str, Any]:
    if (
        config.num_kv_heads != config.num_heads
        or config.head_dim * config.num_heads != config.hidden_size
    ):
        raise ValueError(
            "a GPT-2 checkpoint needs num_kv_heads == num_heads and "
            "head_dim * num_heads == hidden_size"
        )
    return dict(
        architectures=["GPT2LMHeadModel"],
        model_type="gpt2",
        n_embd=config.hidden_size,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        n_inner=config.intermediate_size,
        n_positions=config.max_position_embeddings,
        layer_norm_epsilon=config.norm_eps,
        activation_function="gelu_new",
        bos_token_id=config.eos_token_id,
    )


_H = "transformer.h.{i}."
GPT2 = Family(
    name="gpt2",
    modules=(
        Module("embed_tokens", "transformer.wte", "embedding"),
        Module("embed_positions", "transformer.wpe", "embedding"),
        Module("layers_{i}/input_layernorm", _H + "ln_1", "norm"),
        Module("layers_{i}/post_attention_layernorm", _H + "ln_2", "norm"),
        Module("layers_{i}/self_attn/q_proj", _H + "attn.c_attn", "conv1d", part=0, parts=3),
        Module("layers_{i}/self_attn/k_proj", _H + "attn.c_attn", "conv1d", part=1, parts=3),
        Module("layers_{i}/self_attn/v_proj", _H + "attn.c_attn", "conv1d", part=2, parts=3),
        Module("layers_{i}/self_attn/o_proj", _H + "attn.c_proj", "conv1d"),
        Module("layers_{i}/mlp/up_proj", _H + "mlp.c_fc", "conv1d"),
        Module("layers_{i}/mlp/down_proj", _H + "mlp.c_proj", "conv1d"),
        Module("norm", "transformer.ln_f", "norm"),
        Module("lm_head", "lm_head", "linear"),
    ),
    config_from_hf=_gpt2_from_hf,
    config_to_hf=_gpt2_to_hf,
    hf_buffers=(_H + "attn.bias", _H + "attn.masked_bias"),  # causal masks of old checkpoints
    hf_optional_prefix="transformer.",  # absent from checkpoints of a bare GPT2Model
    peft_ties_head=False,  # PEFT does not tie wte's adapter to lm_head
)

# ----------------------------------------------------------------------------------- Llama


def _llama_from_hf(hf: dict[str, Any]) -> ModelConfig:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _reject(rope_type not in ("default", "llama3"), f"RoPE scaling {rope}")
    _reject(hf.get("hidden_act", "silu") != "silu", f"Llama activation {hf.get('hidden_act')}")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        family="llama",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf["max_position_embeddings"],
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        rope_scaling=RopeScaling(
            rope["factor"],
            rope["low_freq_factor"],
            rope["high_freq_factor"],
            rope["original_max_position_embeddings"],
        )
        if rope_type == "llama3"
        else None,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        eos_token_id=_first(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
    )


def _llama_to_hf(config: ModelConfig) -> dict[str, Any]:
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope |= {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        rope_parameters=rope,
        hidden_act="silu",
        attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias,
        bos_token_id=None,
    )


ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's RoPE frequency divisors (Llama 3.1 on)
# Llama 3's pre-training context, Hugging Face's rope_scaling.original_max_position_embeddings
# in every Llama 3.1 / 3.2 config.json; GGUF files of those models do not record it
LLAMA3_ORIGINAL_CONTEXT = 8192


def _llama_from_gguf(
    get: Callable[..., Any], has_output: bool, tensor: Callable[[str], Any]
) -> ModelConfig:
    heads, hidden = get("llama.attention.head_count"), get("llama.embedding_length")
    head_dim = get("llama.rope.dimension_count", hidden // heads)
    theta = get("llama.rope.freq_base", 10000.0)
    divisors = tensor(ROPE_FREQS)
    return ModelConfig(
        family="llama",
        vocab_size=get("llama.vocab_size") or len(get("tokenizer.ggml.tokens")),
        hidden_size=hidden,
        intermediate_size=get("llama.feed_forward_length"),
        num_layers=get("llama.block_count"),
        num_heads=heads,
        num_kv_heads=get("llama.attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=get("llama.context_length"),
        tie_word_embeddings=not has_output,
        rope_theta=theta,
        rope_scaling=None
        if divisors is None
        else llama3_scaling(
            np.asarray(divisors, np.float64),
            theta,
            head_dim,
            get("llama.rope.scaling.original_context_length", LLAMA3_ORIGINAL_CONTEXT),
        ),
        norm_eps=get("llama.attention.layer_norm_rms_epsilon"),
        eos_token_id=get("tokenizer.ggml.eos_token_id"),
        pad_token_id=get("tokenizer.ggml.padding_token_id"),
    )


def llama3_scaling(
    divisors_h: np.ndarray, theta: float, head_dim: int, original_context: int
) -> RopeScaling | None:
    """Llama 3's RoPE scaling from llama.cpp's `rope_freqs` tensor, or None when it scales
    nothing (every divisor 1).

    llama.cpp stores, per frequency f_i = θ^(-2i/H), the divisor d_i it applies (f_i / d_i):
    1 for wavelengths λ_i = 2π/f_i < L0/high, `factor` for λ_i > L0/low and between those
    1/d = (1 − t)/factor + t with t = (L0/λ − low)/(high − low) (models/layers.py
    ``rope_frequencies``). So factor = max d, and the divisors strictly between 1 and factor
    give t_i = (1/d_i − 1/factor)/(1 − 1/factor), with L0/λ_i = low + (high − low)·t_i: a
    line whose intercept and slope are low and high − low (a least-squares fit over those
    points; at least two are needed). L0 is not in the file and only fixes the units of low
    and high: with `original_context` (Llama 3's 8192) they come out as the model's config
    says (1 and 4). The result is checked: its frequencies must equal f_i / d_i to float32
    precision, else UnsupportedArchitectureError (not Llama 3's scaling).
    """
    divisors_h = np.asarray(divisors_h, np.float64)
    if np.all(divisors_h == 1.0):
        return None
    inv_freq_h = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    _reject(divisors_h.shape != inv_freq_h.shape, f"{ROPE_FREQS} of shape {divisors_h.shape}")
    factor = float(divisors_h.max())
    between = (divisors_h > 1.0 + 1e-6) & (divisors_h < factor * (1.0 - 1e-6))
    t_m = (1.0 / divisors_h[between] - 1.0 / factor) / (1.0 - 1.0 / factor)
    x_m = original_context * inv_freq_h[between] / (2 * np.pi)  # L0 / λ
    _reject(
        len(t_m) < 2,
        f"{ROPE_FREQS} with {len(t_m)} interpolated frequencies (Llama 3's scaling is "
        f"identified from two or more)",
    )
    slope, low = np.polyfit(t_m, x_m, 1)
    # the fit of float32 divisors is exact to ~1e-6; a config's factors are round numbers
    scaling = RopeScaling(factor, round(low, 4), round(low + slope, 4), original_context)
    ours_h = np.asarray(rope_frequencies(head_dim, theta, scaling), np.float64)
    mismatch = np.max(np.abs(ours_h * divisors_h / inv_freq_h - 1.0))
    _reject(
        mismatch > 1e-5,  # float32 frequencies (2^-24 relative) through a few operations
        f"{ROPE_FREQS} that is not Llama 3's RoPE scaling (the closest, {scaling}, is off "
        f"by {mismatch:.2g} relative)",
    )
    return scaling


_L, _B = "model.layers.{i}.", "blk.{i}."
LLAMA = Family(
    name="llama",
    modules=(
        Module("embed_tokens", "model.embed_tokens", "embedding", "token_embd"),
        Module("layers_{i}/input_layernorm", _L + "input_layernorm", "norm", _B + "attn_norm"),
        Module(
            "layers_{i}/post_attention_layernorm",
            _L + "post_attention_layernorm",
            "norm",
            _B + "ffn_norm",
        ),
        Module(
            "layers_{i}/self_attn/q_proj",
            _L + "self_attn.q_proj",
            "linear",
            _B + "attn_q",
            rope_heads="num_heads",
        ),
        Module(
            "layers_{i}/self_attn/k_proj",
            _L + "self_attn.k_proj",
            "linear",
            _B + "attn_k",
            rope_heads="num_kv_heads",
        ),
        Module("layers_{i}/self_attn/v_proj", _L + "self_attn.v_proj", "linear", _B + "attn_v"),
        Module(
            "layers_{i}/self_attn/o_proj", _L + "self_attn.o_proj", "linear", _B + "attn_output"
        ),
        Module("layers_{i}/mlp/gate_proj", _L + "mlp.gate_proj", "linear", _B + "ffn_gate"),
        Module("layers_{i}/mlp/up_proj", _L + "mlp.up_proj", "linear", _B + "ffn_up"),
        Module("layers_{i}/mlp/down_proj", _L + "mlp.down_proj", "linear", _B + "ffn_down"),
        Module("norm", "model.norm", "norm", "output_norm"),
        Module("lm_head", "lm_head", "linear", "output"),
    ),
    config_from_hf=_llama_from_hf,
    config_to_hf=_llama_to_hf,
    config_from_gguf=_llama_from_gguf,
    gguf_config_tensors=(ROPE_FREQS,),
)

FAMILIES = {f.name: f for f in (GPT2, LLAMA)}

# ------------------------------------------------------------------------------ the lookups


def family(config: ModelConfig) -> Family:
    return FAMILIES[config.family]


def hf_family(hf: dict[str, Any]) -> Family:
    """The family of a transformers config.json dict (its model_type)."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture model_type={model_type!r} "
            f"(architectures={hf.get('architectures')}); supported: {tuple(FAMILIES)}"
        )
    return FAMILIES[model_type]


def gguf_family(arch: str | None) -> Family:
    """The family of a GGUF file's general.architecture."""
    supported = tuple(name for name, f in FAMILIES.items() if f.config_from_gguf)
    if arch not in supported:
        raise UnsupportedArchitectureError(
            f"unsupported GGUF architecture {arch!r}; supported: {supported}"
        )
    return FAMILIES[arch]


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """The transformers ``config.json`` dict of `config` (what `Family.config_from_hf` reads)."""
    return dict(
        family(config).config_to_hf(config),
        vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_word_embeddings,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        dtype=str(config.param_dtype),
    )


class Place(NamedTuple):
    """Where one of our parameters lives in a checkpoint: its table row and its names there."""

    module: Module
    hf: str  # transformers module name, "model.layers.3.mlp.up_proj"
    gguf: str | None  # GGUF tensor name without its leaf, "blk.3.ffn_up"
    leaf: str  # our parameter's name in its module: "kernel", "bias", ...

    def tensor(self, fmt: str) -> str:
        """The checkpoint tensor's name in format `fmt` ("hf" or "gguf")."""
        return f"{getattr(self, fmt)}.{'bias' if self.leaf == 'bias' else 'weight'}"


_LAYER = re.compile(r"layers_(\d+)/")


def locate(config: ModelConfig, path: str, layer: int | None = None) -> Place | None:
    """Where our parameter `path` lives (``"layers_0/mlp/up_proj/kernel"``, or a scanned
    ``"layers/mlp/up_proj/kernel"`` with its `layer` index); None if no module holds it."""
    module_path, _, leaf = path.rpartition("/")
    if layer is not None:
        module_path = re.sub(r"^layers/", f"layers_{layer}/", module_path)
    match = _LAYER.match(module_path)
    index = int(match[1]) if match else None
    key = _LAYER.sub("layers_{i}/", module_path, count=1)
    for row in family(config).modules:
        if row.ours == key:
            gguf = None if row.gguf is None else row.gguf.format(i=index)
            return Place(row, row.hf.format(i=index), gguf, leaf)
    return None


def to_ours(place: Place, array: Any, out_in: bool) -> Any:
    """Our value of `place`'s parameter from its checkpoint tensor `array`, whose matrices are
    (out, in) if `out_in`: a kernel is transposed, a fused module's part cut out (along the
    last axis). `array` is a numpy array or a view that reads on use (models/loaders/lazy.py):
    only `.T`, `.shape` and slicing are used."""
    value = array.T if out_in and place.leaf == "kernel" else array
    module = place.module
    width = value.shape[-1] // module.parts
    return value[..., module.part * width : (module.part + 1) * width]


def to_hf(place: Place, value: Any) -> Any:
    """The transformers tensor of `place` from our value (of all the parts of a fused module,
    concatenated in order along the last axis)."""
    return value.T if place.module.kind == "linear" and place.leaf == "kernel" else value


def dropped(config: ModelConfig, fmt: str) -> set[str]:
    """Checkpoint tensors that loading skips: buffers, tensors of the config (GGUF's
    `rope_freqs`), and a tied output head (it is the embedding; some checkpoints save it
    anyway)."""
    names = set(family(config).gguf_config_tensors) if fmt == "gguf" else set()
    if fmt == "hf":
        names = {b.format(i=i) for b in family(config).hf_buffers for i in range(config.num_layers)}
    head = locate(config, "lm_head/kernel")
    if config.tie_word_embeddings and head is not None and getattr(head, fmt) is not None:
        names.add(head.tensor(fmt))
    return names
