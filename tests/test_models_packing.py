"""models.Decoder with `segment_ids`: a packed row computes what its examples compute alone."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import models
from models import decoder

LENGTHS = [(5, 7, 4), (9, 6)]  # examples packed into each of two rows
L = 20  # row length; the rest of each row is padding


def _examples():
    """Token ids of every example, row by row: [[ids_n, ...], ...]."""
    rng = np.random.default_rng(0)
    return [[rng.integers(1, 128, n).astype(np.int32) for n in row] for row in LENGTHS]


def _packed(examples):
    """(ids, segment_ids, positions), each (rows, L) int32, as train/batching.py lays them out."""
    shape = (len(examples), L)
    ids, segments, positions = (np.zeros(shape, np.int32) for _ in range(3))
    for r, row in enumerate(examples):
        start = 0
        for segment, ids_n in enumerate(row, start=1):
            span = slice(start, start + len(ids_n))
            ids[r, span], segments[r, span], positions[r, span] = ids_n, segment, np.arange(len(ids_n))
            start = span.stop
    return ids, segments, positions


@pytest.fixture(scope="module", params=[
    ("tiny-llama", False), ("tiny-llama", True), ("tiny-gpt2", False), ("tiny-gpt2", True)],
    ids=lambda p: f"{p[0]}-{'scan' if p[1] else 'unrolled'}")
def model_params(request):
    """(model, params) with weights large enough that attention is far from uniform."""
    name, scan = request.param
    model = models.Decoder(models.get_config(name, scan_layers=scan))
    params = jax.jit(lambda key: models.init_params(model, key))(jax.random.key(0))
    return model, jax.tree.map(lambda p: 10 * p if p.ndim > 1 else p, params)


def _alone(model, params, examples):
    """Logits of every example in its own row (right-padded, which causal attention ignores)."""
    flat = [ids_n for row in examples for ids_n in row]
    ids = np.zeros((len(flat), max(map(len, flat))), np.int32)
    for i, ids_n in enumerate(flat):
        ids[i, :len(ids_n)] = ids_n
    logits = np.asarray(jax.jit(model.apply)({"params": params}, ids))
    return [logits[i, :len(ids_n)] for i, ids_n in enumerate(flat)]


def test_packed_rows_give_each_example_its_own_logits(model_params):
    model, params = model_params
    examples = _examples()
    ids, segments, positions = _packed(examples)
    apply = jax.jit(model.apply)
    packed = np.asarray(apply({"params": params}, ids, positions=positions, segment_ids=segments))
    leaked = np.asarray(apply({"params": params}, ids, positions=positions))
    assert np.isfinite(packed).all()  # padding (segment 0) sees no key and stays finite
    alone = iter(_alone(model, params, examples))
    worst_leak = 0.0
    for r, row in enumerate(examples):
        start = 0
        for ids_n in row:
            expected = next(alone)
            span = slice(start, start + len(ids_n))
            np.testing.assert_allclose(packed[r, span], expected, rtol=0, atol=1e-5)
            worst_leak = max(worst_leak, np.abs(leaked[r, span] - expected).max())
            start = span.stop
    assert worst_leak > 1e-2  # without segments the examples see each other: the test can fail


def test_attention_mask_still_hides_keys_within_a_segment(model_params):
    """A padded key inside a segment is hidden as with `attention_mask` alone."""
    model, params = model_params
    ids, segments, positions = _packed(_examples())
    mask = (segments > 0).astype(np.int32)
    mask[0, 2] = 0
    apply = jax.jit(model.apply)
    both = apply({"params": params}, ids, mask, positions, segment_ids=segments)
    expected = apply({"params": params}, ids[:1, :5], mask[:1, :5])
    np.testing.assert_allclose(np.asarray(both)[0, :5], np.asarray(expected)[0], atol=1e-5)


def test_segment_ids_are_refused_when_decoding_or_misshapen():
    model = models.Decoder(models.get_config("tiny-llama"))
    variables = decoder.abstract_variables(model, 1, 8, decode=True)  # shapes only: fails early
    ids = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="decode=True"):
        jax.eval_shape(lambda v: model.apply(v, ids, decode=True, segment_ids=ids,
                                             mutable=["cache"]), variables)
    with pytest.raises(ValueError, match=r"segment_ids have shape \(1, 3\)"):
        jax.eval_shape(lambda p: model.apply({"params": p}, ids, segment_ids=ids[:, :3]),
                       variables["params"])
