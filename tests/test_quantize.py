"""`lora_jax._quantize`: int8 and packed nf4 storage of frozen kernels — the exact bytes of
the live buffers, and quantize → dequantize within each format's bound.

Quantize and dequantize run jitted (`QuantizedArray` is a pytree, so both jit): one compile
per format and shape where eagerly every op compiles apart, seconds on a small CPU."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import _quantize
from lora_jax._layout import Layout

import tolerances as tol

# 3 stacked layers of 64 x 40 (numpy draws it: an eager jax.random.normal compiles too).
W = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64, 40), np.float32))
_dequantize = jax.jit(lambda q: q.dequantize())


@functools.cache
def _quantized(fmt: str, block_size: int = 64) -> _quantize.QuantizedArray:
    """W as `fmt` (one stacked axis, one input axis), quantized once per (format, block)."""
    quantize = jax.jit(_quantize.quantize_array, static_argnums=(1, 2, 3))
    return quantize(W, fmt, Layout(1, 1), block_size)


def test_nf4_packs_two_values_per_byte_with_bfloat16_block_scales():
    q = _quantized("nf4", 64)
    n = W.size
    assert q.data.dtype == np.uint8 and q.shape == W.shape
    # n/2 bytes of packed 4-bit indices plus one 2-byte scale per block of 64.
    assert q.nbytes == n // 2 + 2 * (n // 64)
    assert q.nbytes / n == 0.5 + 2 / 64


def test_int8_stores_one_byte_per_value_and_a_scale_per_output_channel():
    q = _quantized("int8")
    assert q.data.dtype == np.int8 and q.scale.shape == (3, 1, 40)
    assert q.nbytes == W.size + 4 * 3 * 40


def test_int8_round_trip_is_within_half_a_step():
    q = _quantized("int8")
    back = np.asarray(_dequantize(q), np.float64)
    step = np.asarray(q.scale, np.float64)
    # round(w/c) is within 1/2 of w/c; w/c and c·q are one rounding each (γ_2 of |w|).
    atol = step / 2 + tol.dot_error(np.abs(np.asarray(W)), 2)
    tol.assert_close(back, np.asarray(W, np.float64), atol, "int8")


@pytest.mark.parametrize("block_size", [64, 16])
def test_nf4_round_trip_is_within_half_the_largest_level_gap(block_size):
    q = _quantized("nf4", block_size)
    back = np.asarray(_dequantize(q), np.float64)
    scale_per_value = np.repeat(np.asarray(q.scale, np.float64), block_size, axis=-1)
    scale_per_value = scale_per_value.reshape(W.shape)
    assert np.all(scale_per_value >= np.abs(np.asarray(W)))  # scales rounded up
    # The nearest level is within half a gap of w/a; w/a and a·level round once each.
    atol = _quantize.NF4_HALF_GAP * scale_per_value + tol.dot_error(np.abs(np.asarray(W)), 2)
    tol.assert_close(back, np.asarray(W, np.float64), atol, "nf4")
    assert not tol.close(back, np.asarray(W), atol / 4)  # the bound is not loose by 4x


def test_the_factored_forward_runs_a_quantized_base_as_its_dequantised_copy():
    model = nn.Sequential([nn.Dense(48), nn.relu, nn.Dense(16)])
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 32), np.float32))
    shapes = jax.eval_shape(model.init, jax.random.key(2), x)["params"]
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
    config = lj.LoraConfig(2, 4, "kernel")
    # B != 0 (+ 0.1): the adapter does something.
    adapted = jax.jit(
        lambda p: jax.tree.map(lambda a: a + 0.1, lj.init(jax.random.key(3), p, config))
    )(params)
    # One jitted forward for all four trees: the two dequantised copies share one compile.
    forward = jax.jit(lj.apply(model.apply))
    quantize, dequantize = jax.jit(lj.quantize, static_argnums=(1, 2)), jax.jit(lj.dequantize)
    for fmt in ("int8", "nf4"):
        quantized = quantize(adapted, fmt, "kernel")
        ours = forward({"params": quantized}, x)
        expected = forward({"params": dequantize(quantized)}, x)
        # Same dequantised weights, two routes (our einsum vs nn.Dense's dot_general): each
        # within γ of two layers' reductions (32, then 48, plus rank 2 and 4 roundings).
        atol = tol.chain_atol(32 + 48 + 2 * 2 + 4, tol.scale_of(expected))
        tol.assert_close(ours, expected, atol, fmt)
        assert isinstance(quantized["layers_0"]["kernel"], lj.QuantizedArray)
        assert quantized["layers_0"]["kernel"].data.dtype == jnp.dtype(
            "int8" if fmt == "int8" else "uint8"
        )
