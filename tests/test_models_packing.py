"""models.Decoder with `segment_ids`: a packed row computes what its examples compute alone."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import models
from models import decoder

import tolerances as tol

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
            ids[r, span], segments[r, span], positions[r, span] = (
                ids_n,
                segment,
                np.arange(len(ids_n)),
            )
            start = span.stop
    return ids, segments, positions


@pytest.fixture(
    scope="module",
    params=[("tiny-llama", False), ("tiny-llama", True), ("tiny-gpt2", False), ("tiny-gpt2", True)],
    ids=lambda p: f"{p[0]}-{'scan' if p[1] else 'unrolled'}",
)
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
        ids[i, : len(ids_n)] = ids_n
    logits = np.asarray(jax.jit(model.apply)({"params": params}, ids))
    return [logits[i, : len(ids_n)] for i, ids_n in enumerate(flat)]


def _atol(model, expected):
    """Packed and alone differ in rounding only (attention over L keys, mostly masked, vs
    over the example's own): the logits' chain of tolerances.py at their scale."""
    return tol.logits_atol(model.config, np.concatenate(expected), keys=L)


def _as_packed(logits, examples):
    """Each example's rows of packed `logits` (rows, L, vocab), in order."""
    spans = []
    for r, row in enumerate(examples):
        start = 0
        for ids_n in row:
            spans.append(logits[r, start : start + len(ids_n)])
            start += len(ids_n)
    return spans


def test_packed_rows_give_each_example_its_own_logits(model_params):
    model, params = model_params
    examples = _examples()
    ids, segments, positions = _packed(examples)
    apply = jax.jit(model.apply)
    packed = np.asarray(apply({"params": params}, ids, positions=positions, segment_ids=segments))
    leaked = np.asarray(apply({"params": params}, ids, positions=positions))
    assert np.isfinite(packed).all()  # padding (segment 0) sees no key and stays finite
    alone = _alone(model, params, examples)
    atol = _atol(model, alone)
    for got, expected in zip(_as_packed(packed, examples), alone, strict=True):
        tol.assert_close(got, expected, atol)
    # Without segments the examples see each other: the tolerance can fail.
    assert not all(
        tol.close(got, expected, atol) for got, expected in zip(_as_packed(leaked, examples), alone)
    )


def _boundary_off_by_one(segments, positions):
    """The second example's first token counted in the first example's segment."""
    segments = segments.copy()
    segments[0, 5] = segments[0, 4]
    return segments, positions


def _positions_restart_late(segments, positions):
    """The second example's first token still numbered on from the first example.

    (Not restarting a whole example's positions would be no bug for Llama: RoPE attention
    sees relative positions only.)"""
    positions = positions.copy()
    positions[0, 5] = positions[0, 4] + 1
    return segments, positions


@pytest.mark.parametrize(
    "bug",
    [_boundary_off_by_one, _positions_restart_late],
    ids=["segment boundary one token late", "positions restart one token late"],
)
def test_the_packing_tolerance_fails_for_a_planted_bug(model_params, bug):
    model, params = model_params
    examples = _examples()
    ids, segments, positions = _packed(examples)
    segments, positions = bug(segments, positions)
    buggy = np.asarray(
        jax.jit(model.apply)({"params": params}, ids, positions=positions, segment_ids=segments)
    )
    alone = _alone(model, params, examples)
    assert not all(
        tol.close(got, expected, _atol(model, alone))
        for got, expected in zip(_as_packed(buggy, examples), alone)
    )


def test_attention_mask_still_hides_keys_within_a_segment(model_params):
    """A padded key inside a segment is hidden as with `attention_mask` alone."""
    model, params = model_params
    ids, segments, positions = _packed(_examples())
    mask = (segments > 0).astype(np.int32)
    mask[0, 2] = 0
    apply = jax.jit(model.apply)
    both = apply({"params": params}, ids, mask, positions, segment_ids=segments)
    expected = np.asarray(apply({"params": params}, ids[:1, :5], mask[:1, :5]))[0]
    tol.assert_close(np.asarray(both)[0, :5], expected, _atol(model, [expected]))


def test_segment_ids_are_refused_when_decoding_or_misshapen():
    model = models.Decoder(models.get_config("tiny-llama"))
    variables = decoder.abstract_variables(model, 1, 8, decode=True)  # shapes only: fails early
    ids = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="decode=True"):
        jax.eval_shape(
            lambda v: model.apply(v, ids, decode=True, segment_ids=ids, mutable=["cache"]),
            variables,
        )
    with pytest.raises(ValueError, match=r"segment_ids have shape \(1, 3\)"):
        jax.eval_shape(
            lambda p: model.apply({"params": p}, ids, segment_ids=ids[:, :3]), variables["params"]
        )
