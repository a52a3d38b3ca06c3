"""Real SmolLM2-135M-Instruct (the embedded GGUF) against transformers loading the same file
in float32: logits, greedy tokens and tokenizer."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import models

import tolerances as tol

pytestmark = pytest.mark.slow

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "name[The Eagle], eatType[coffee shop], food[Japanese], priceRange[less than £20]",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]


@pytest.fixture(scope="module")
def smollm2():
    """(our model, params, tokenizer, transformers model, transformers tokenizer), loaded once."""
    transformers = pytest.importorskip("transformers")
    path = models.embedded_gguf("smollm2-135m")
    model, params, tokenizer = models.load("smollm2-135m", scan_layers=True)
    kwargs = dict(gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=torch.float32, **kwargs
    ).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
    return model, params, tokenizer, hf, hf_tokenizer


def _right_padded(tokenizer, prompts):
    rows = [tokenizer.encode(p).ids for p in prompts]
    length = max(map(len, rows))
    ids = np.array([r + [2] * (length - len(r)) for r in rows], np.int32)
    mask = np.array([[1] * len(r) + [0] * (length - len(r)) for r in rows], np.int32)
    return ids, mask


def test_config_matches_the_gguf_facts(smollm2):
    model, params, *_ = smollm2
    # The GGUF stores eps as float32 (9.9999997e-06, one rounding); transformers reads the same.
    assert model.config.norm_eps == pytest.approx(1e-5, rel=tol.unit_roundoff())
    loaded = models.with_options(model.config, scan_layers=False, norm_eps=1e-5)
    assert loaded == models.get_config("smollm2-135m")
    assert sum(x.size for x in jax.tree.leaves(params)) == 134_515_008


def test_logits_match_transformers(smollm2):
    model, params, tokenizer, hf, _ = smollm2
    ids, mask = _right_padded(tokenizer, PROMPTS)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask))
    with torch.no_grad():
        expected = hf(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
        ).logits
    real = mask.astype(bool)
    expected = expected.numpy()[real]
    # 30 layers of float32, XLA against torch: the chain of tolerances.py.
    tol.assert_close(ours[real], expected, tol.logits_atol(model.config, expected, ids.shape[1]))


def test_twenty_greedy_tokens_match_transformers(smollm2):
    model, params, tokenizer, hf, _ = smollm2
    prompt = "<|im_start|>user\nWrite a poem about the sea.<|im_end|>\n<|im_start|>assistant\n"
    ids = np.array([tokenizer.encode(prompt).ids], np.int32)
    ours = np.asarray(models.generate(model, params, ids, max_new_tokens=20))  # EOS <|im_end|> = 2
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor(ids, dtype=torch.long), max_new_tokens=20, do_sample=False, pad_token_id=2
        ).numpy()[0, ids.shape[1] :]
    assert expected.shape == (20,) and 2 not in expected  # twenty real tokens to compare
    np.testing.assert_array_equal(ours[0], expected)


def test_tokenizer_matches_transformers_and_knows_chatml(smollm2):
    *_, tokenizer, _, hf_tokenizer = smollm2
    # Strings without a digit after a whitespace run, where llama.cpp's digit split (ours) and
    # transformers' GGUF tokenizer agree.
    for text in PROMPTS + ["Hello world, 1 2 3 and 2024!", "naïve café — ünïcode ✓"]:
        assert tokenizer.encode(text).ids == hf_tokenizer(text)["input_ids"], text
        assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert (ids[0], ids[-1]) == (
        hf_tokenizer.convert_tokens_to_ids("<|im_start|>"),
        hf_tokenizer.eos_token_id,
    )
    assert tokenizer.encode("2024").ids == [tokenizer.token_to_id(d) for d in "2024"]
