"""models.generate with adapter_ids: each prompt decodes with its own slot of a bank, token
for token as that adapter alone (greedy, sampling, beam search), -1 as the base; hot swaps
do not recompile the decoding loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_bank import LLAMA_ADAPTERS, _adapters

import lora_jax as lj
import models
from models.generate import _generate  # the jitted decoding loop, to count its compilations

IDS = [1, -1, 0, 2]


@pytest.fixture(scope="module")
def setup():
    cfg = models.get_config("tiny-llama")
    model = models.Decoder(cfg)
    base = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(0))
    # Factors large enough (0.3 per element) that the adapters change the greedy tokens.
    adapters = _adapters(base, LLAMA_ADAPTERS, 30)
    prompts = jax.random.randint(jax.random.key(5), (len(IDS), 6), 1, cfg.vocab_size)
    return model, base, adapters, prompts


SETTINGS = {
    "greedy": {},
    "sampling": {"do_sample": True, "temperature": 0.8, "top_k": 20, "rng": jax.random.key(3)},
    "beam_search": {"num_beams": 3},
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_mixed_adapter_generation_equals_each_adapter_alone(setup, setting):
    model, base, adapters, prompts = setup
    kwargs = dict(max_new_tokens=8, eos_token_id=-1, **SETTINGS[setting])
    bank = lj.stack(adapters)
    mixed = models.generate(
        model, lj.combine(base, bank), prompts, adapter_ids=jnp.array(IDS), **kwargs
    )
    # Second path: the whole batch with one adapter through the single-adapter forward (same
    # batch shape, so sampling draws the same noise per row), the base through the plain model.
    alone = {-1: models.generate(model, base, prompts, **kwargs)}
    for i, adapter in enumerate(adapters):
        alone[i] = models.generate(model, lj.combine(base, adapter), prompts, **kwargs)
    for row, i in enumerate(IDS):
        np.testing.assert_array_equal(mixed[row], alone[i][row], err_msg=f"row {row}, slot {i}")
    # The adapters decide the tokens here: not all runs agree on every row.
    assert len({tuple(np.asarray(alone[i][0])) for i in alone}) > 1


def test_hot_swaps_do_not_recompile_generation(setup):
    model, base, adapters, prompts = setup
    bank = lj.stack(adapters)
    ids = jnp.array(IDS)
    models.generate(model, lj.combine(base, bank), prompts, adapter_ids=ids, max_new_tokens=4)
    compiled = _generate._cache_size()
    for swap in range(100):
        r, targets, alpha = LLAMA_ADAPTERS[swap % 3]
        bank = lj.put(bank, swap % 3, _adapters(base, [(1 + swap % 2, targets, alpha)], swap)[0])
        models.generate(model, lj.combine(base, bank), prompts, adapter_ids=ids, max_new_tokens=4)
    assert _generate._cache_size() == compiled


def test_adapter_ids_need_a_bank_and_a_bank_needs_adapter_ids(setup):
    model, base, adapters, prompts = setup
    with pytest.raises(ValueError, match="give both or neither"):
        models.generate(model, base, prompts, adapter_ids=jnp.array(IDS))
    with pytest.raises(ValueError, match="give both or neither"):
        models.generate(model, lj.combine(base, lj.stack(adapters)), prompts)
