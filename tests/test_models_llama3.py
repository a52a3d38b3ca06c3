"""Llama 3 at real scale: the presets' shapes, and Llama 3's RoPE frequency scaling, against
transformers (its ``llama3`` RoPE and a LlamaForCausalLM with that scaling)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import models
from models import hf_export
from models.config import PRESETS, RopeScaling
from models.families import FAMILIES, hf_config
from models.layers import rope_frequencies

import tolerances as tol

# The parameter totals of the published checkpoints: the "total_size" of each one's
# model.safetensors index (bfloat16, 2 bytes a parameter), halved.
PUBLISHED_PARAMETERS = {
    "llama-3.2-1b": 2_471_628_800 // 2,
    "llama-3.1-8b": 16_060_522_496 // 2,
    "llama-3.1-70b": 141_107_412_992 // 2,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_presets_have_the_published_parameter_count(name):
    model = models.Decoder(PRESETS[name])
    ids = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))  # no memory used
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert count == PUBLISHED_PARAMETERS[name]


def _hf_config(config: models.ModelConfig) -> transformers.LlamaConfig:
    """The transformers config of ``config``, as models/families.py writes it."""
    return transformers.LlamaConfig(**hf_config(config))


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b"])
def test_rope_frequencies_match_transformers_llama3(name):
    config = PRESETS[name]
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](_hf_config(config), "cpu")
    ours = np.asarray(rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling))
    unscaled = np.asarray(rope_frequencies(config.head_dim, config.rope_theta))
    # the three bands exist: kept, divided by the factor, interpolated between
    factor = config.rope_scaling.factor
    assert np.any(ours == unscaled) and np.any(np.isclose(ours, unscaled / factor, rtol=1e-6))
    assert np.any((ours < unscaled) & (ours > unscaled / factor))
    # float32, a power, a division and at most 8 further roundings each, on values <= 1
    tol.assert_close(ours, theirs.numpy(), tol.chain_atol(12, 1.0), "inverse frequencies")


def test_a_llama3_scaled_model_matches_transformers_past_its_original_context(tmp_path):
    """A tiny Llama whose scaling starts at 16 positions, run to 48: every band is used."""
    scaling = RopeScaling(4.0, 1.0, 4.0, 16)
    config = models.ModelConfig(
        family="llama",
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rope_theta=500.0,
        rope_scaling=scaling,
        norm_eps=1e-6,
    )
    model = models.Decoder(config)
    ids = np.random.default_rng(0).integers(3, 96, size=(2, 48)).astype(np.int32)
    params = jax.tree.map(
        lambda x: 4 * x, models.init_params(model, jax.random.key(0))
    )  # larger weights: position matters more
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    directory = hf_export.save_hf(tmp_path / "hf", config, params)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    tol.assert_close(ours, theirs, tol.logits_atol(config, theirs, keys=48), "logits")
    # the scaling matters here: without it the logits differ far beyond the tolerance
    plain = models.Decoder(dataclasses.replace(config, rope_scaling=None))
    unscaled = np.asarray(plain.apply({"params": params}, jnp.asarray(ids)))
    assert not tol.close(unscaled, theirs, tol.logits_atol(config, theirs, keys=48))
    # and models.load reads the scaling back from the config it wrote
    assert models.load(directory)[0].config.rope_scaling == scaling


def test_a_rope_scaling_we_do_not_implement_is_refused():
    hf = hf_config(PRESETS["llama-3.1-8b"])
    hf["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0}
    with pytest.raises(models.UnsupportedArchitectureError, match="RoPE scaling"):
        FAMILIES["llama"].config_from_hf(hf)
    hf["rope_parameters"] = dict(
        rope_type="llama3", rope_theta=500000.0, **dataclasses.asdict(RopeScaling(8, 1, 4, 8192))
    )
    assert FAMILIES["llama"].config_from_hf(hf) == PRESETS["llama-3.1-8b"]


def _llama_cpp_rope_freqs(config: models.ModelConfig) -> np.ndarray:
    """``rope_freqs.weight`` as llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel)
    computes it from a Hugging Face config: per frequency, the divisor llama.cpp applies."""
    s = config.rope_scaling
    freqs = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
    low_wavelength = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelength = s.original_max_position_embeddings / s.high_freq_factor
    factors = []
    for freq in freqs:
        wavelength = 2 * np.pi / freq
        if wavelength < high_wavelength:
            factors.append(1.0)
        elif wavelength > low_wavelength:
            factors.append(s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.asarray(factors, np.float32)


def _write_gguf(path, config: models.ModelConfig, rope_freqs: np.ndarray | None) -> str:
    """A GGUF header of ``config`` (Llama) with the embedding and, when given, rope_freqs."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {
        "block_count": config.num_layers,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_heads,
        "attention.head_count_kv": config.num_kv_heads,
        "context_length": config.max_position_embeddings,
        "vocab_size": 16,
    }.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32("llama.rope.freq_base", config.rope_theta)
    writer.add_tensor("token_embd.weight", np.ones((16, config.hidden_size), np.float32))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    writer.add_tensor("output.weight", np.ones((16, config.hidden_size), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b"])
def test_a_gguf_file_s_rope_freqs_give_the_model_s_llama3_scaling(tmp_path, name):
    """Llama 3.1+ GGUF files carry the RoPE scaling only as llama.cpp's per-frequency
    divisors; loading must recover the scaling of the model's config.json, by both readers
    (the header-only config and the tensor reader, which must not call it an unknown
    tensor), and run transformers' llama3 frequencies."""
    from models.loaders.gguf import gguf_config, gguf_tensors

    preset = dataclasses.replace(PRESETS[name], num_layers=1)
    path = _write_gguf(tmp_path / "m.gguf", preset, _llama_cpp_rope_freqs(preset))
    from_header = gguf_config(path)
    from_tensors, _, unmatched, _ = gguf_tensors(path)
    assert from_header.rope_scaling == from_tensors.rope_scaling == preset.rope_scaling
    assert "rope_freqs.weight" not in unmatched and "token_embd.weight" not in unmatched
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](_hf_config(preset), "cpu")
    ours = rope_frequencies(preset.head_dim, preset.rope_theta, from_header.rope_scaling)
    # float32, a power, a division and at most 8 further roundings each, on values <= 1
    tol.assert_close(np.asarray(ours), theirs.numpy(), tol.chain_atol(12, 1.0), "frequencies")
    # without rope_freqs the file is unscaled
    plain = _write_gguf(tmp_path / "plain.gguf", preset, None)
    assert gguf_config(plain).rope_scaling is None


def test_gguf_rope_freqs_that_are_not_llama3_s_scaling_are_refused(tmp_path):
    preset = dataclasses.replace(PRESETS["llama-3.1-8b"], num_layers=1)
    divisors = _llama_cpp_rope_freqs(preset)
    divisors[3] = 2.0  # a kept frequency divided: no llama3 scaling gives this
    path = _write_gguf(tmp_path / "odd.gguf", preset, divisors)
    from models.loaders.gguf import gguf_config

    with pytest.raises(models.UnsupportedArchitectureError, match="not Llama 3's RoPE scaling"):
        gguf_config(path)
