"""models.generate with adapter_ids: each prompt decodes with its own slot of a bank, token
for token as that adapter alone (greedy, sampling, beam search), -1 as the base; hot swaps
do not recompile the decoding loop.

Test time: two decoding loops compile per setting, the bank's and the plain model's: the
references are the adapters merged into the base (one tree structure, one program, for all
of them and the base); the hot-swap test reuses the greedy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_bank import LLAMA_ADAPTERS, _adapters, base_params

import lora_jax as lj
import models
from models.generate import _generate  # the jitted decoding loop, to count its compilations

IDS = [1, -1, 0, 2]
SETTINGS = {
    "greedy": {},
    "sampling": {"do_sample": True, "temperature": 0.8, "top_k": 20, "rng": jax.random.key(3)},
    "beam_search": {"num_beams": 2},
}


@pytest.fixture(scope="module")
def setup():
    cfg = models.get_config("tiny-llama")
    model = models.Decoder(cfg)
    base = base_params(cfg)
    # Factors large enough (0.3 per element) that the adapters change the greedy tokens.
    adapters = _adapters(base, LLAMA_ADAPTERS, 30)
    prompts = jax.random.randint(jax.random.key(5), (len(IDS), 5), 1, cfg.vocab_size)
    return model, base, adapters, prompts


def _decode(model, params, prompts, setting, **kwargs):
    return models.generate(
        model, params, prompts, max_new_tokens=6, eos_token_id=-1, **SETTINGS[setting], **kwargs
    )


def _merged(base, adapter):
    return lj.merge(lj.combine(base, adapter))


@pytest.mark.parametrize("setting", SETTINGS)
def test_mixed_adapter_generation_equals_each_adapter_alone(setup, setting):
    model, base, adapters, prompts = setup
    bank = lj.combine(base, lj.stack(adapters))
    mixed = _decode(model, bank, prompts, setting, adapter_ids=jnp.array(IDS))
    # Second path: the whole batch with one adapter merged into the base (same batch shape,
    # so sampling draws the same noise per row), and the base, through the plain model.
    alone = {i: _decode(model, _merged(base, a), prompts, setting) for i, a in enumerate(adapters)}
    alone[-1] = _decode(model, base, prompts, setting)
    for row, i in enumerate(IDS):
        np.testing.assert_array_equal(mixed[row], alone[i][row], err_msg=f"row {row}, slot {i}")
    # The adapters decide the tokens here: not all runs agree on every row.
    assert len({tuple(np.asarray(alone[i][0])) for i in alone}) > 1


def test_hot_swaps_do_not_recompile_generation(setup):
    model, base, adapters, prompts = setup
    bank = lj.stack(adapters)
    ids = jnp.array(IDS)
    before = _decode(model, lj.combine(base, bank), prompts, "greedy", adapter_ids=ids)
    compiled = _generate._cache_size()
    # Adapters of ranks 1..3 (every target's bank rank is 3 or 4), one per slot's targets.
    incoming = [
        _adapters(base, [(1 + j, targets, alpha)], 100 + j)[0]
        for j, (_, targets, alpha) in enumerate(LLAMA_ADAPTERS)
    ]
    for swap in range(100):
        bank = lj.put(bank, swap % 3, incoming[swap % 3])
        after = _decode(model, lj.combine(base, bank), prompts, "greedy", adapter_ids=ids)
    assert _generate._cache_size() == compiled
    # The swaps took effect: slot 0's row (row 2) decodes as incoming[0] alone, not as before.
    alone = _decode(model, _merged(base, incoming[0]), prompts, "greedy")
    np.testing.assert_array_equal(after[2], alone[2])
    assert not np.array_equal(after[2], before[2])


def test_adapter_ids_need_a_bank_and_a_bank_needs_adapter_ids(setup):
    model, base, adapters, prompts = setup
    with pytest.raises(ValueError, match="give both or neither"):
        models.generate(model, base, prompts, adapter_ids=jnp.array(IDS))
    with pytest.raises(ValueError, match="give both or neither"):
        models.generate(model, lj.combine(base, lj.stack(adapters)), prompts)
