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


def _block_absmax(block_size: int) -> np.ndarray:
    """a: max |W| of each block of `block_size` of each layer, float64 (3, blocks)."""
    flat = np.asarray(W, np.float64).reshape(3, -1)
    flat = np.pad(flat, [(0, 0), (0, -flat.shape[1] % block_size)])
    return np.abs(flat.reshape(3, -1, block_size)).max(axis=-1)


def _block_scales(q: _quantize.QuantizedArray) -> np.ndarray:
    """â = mean + step·code read off the stored arrays, float64 (3, blocks)."""
    code = np.asarray(q.scale.code, np.float64)
    step = np.repeat(np.asarray(q.scale.step, np.float64), _quantize.SCALE_GROUP, axis=-1)
    return np.asarray(q.scale.mean, np.float64) + step[:, : code.shape[1]] * code


@pytest.mark.parametrize("block_size", [64, 8])
def test_nf4_packs_two_values_per_byte_with_double_quantised_block_scales(block_size):
    q = _quantized("nf4", block_size)
    per_layer = W.size // 3  # 2560 values
    blocks = per_layer // block_size  # 40 at 64; 320 at 8: two groups of 256 scales
    groups = -(-blocks // 256)
    assert q.data.dtype == np.uint8 and q.shape == W.shape
    assert q.scale.code.dtype == np.int8 and q.scale.code.shape == (3, blocks)
    assert q.scale.step.shape == (3, groups) and q.scale.mean.shape == (3, 1)
    # Per layer: packed indices (1/2 byte a value), an int8 code per block, a float32 step
    # per group of 256 blocks, one float32 mean; counted from the live buffers.
    assert q.nbytes == 3 * (per_layer // 2 + blocks + 4 * groups + 4)


def test_nf4_stores_a_smollm2_projection_in_under_0_53_bytes_per_parameter():
    w = jnp.zeros((576, 576), jnp.float32)  # SmolLM2-135M's q_proj: 5184 blocks, 21 groups
    q = jax.jit(_quantize.quantize_array, static_argnums=(1, 2))(w, "nf4", Layout(0, 1))
    assert q.nbytes == 576 * 576 // 2 + 5184 + 4 * 21 + 4 == 171160
    assert q.nbytes / w.size <= 0.53  # 0.51589: 1/2 + 1/64 + 4/(64·256) + 4/576²


@pytest.mark.parametrize("block_size", [64, 8])
def test_nf4_block_scales_are_within_half_a_step_of_the_block_absmax(block_size):
    q = _quantized("nf4", block_size)
    absmax, scales = _block_absmax(block_size), _block_scales(q)
    step = np.repeat(np.asarray(q.scale.step, np.float64), 256, axis=-1)[:, : absmax.shape[1]]
    mean = np.asarray(q.scale.mean, np.float64)
    # The mean is one float32 sum of `blocks` terms, then a division.
    tol.assert_close(
        mean, absmax.mean(-1, keepdims=True), tol.dot_error(absmax.max(), absmax.shape[1] + 1)
    )
    # round((a − μ)/g) is within 1/2 of (a − μ)/g; a − μ, the division, g·code and μ + g·code
    # round once each, on magnitudes at most |a| + |μ| + g.
    atol = step / 2 + tol.dot_error(absmax + np.abs(mean) + step, 4)
    tol.assert_close(scales, absmax, atol, "block scales")
    assert not tol.close(scales, absmax, atol / 4)  # the bound is not loose by 4x


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


@pytest.mark.parametrize("block_size", [64, 8])
def test_nf4_round_trip_is_within_half_the_largest_level_gap_or_the_scale_error(block_size):
    q = _quantized("nf4", block_size)
    back = np.asarray(_dequantize(q), np.float64)
    w = np.asarray(W, np.float64)

    def per_value(per_block):
        return np.repeat(per_block, block_size, axis=-1)[:, : w[0].size].reshape(W.shape)

    absmax, scales = per_value(_block_absmax(block_size)), per_value(_block_scales(q))
    # Values are quantized against the stored scale â: within |â| the nearest level is half
    # a gap of w/â away; beyond it (â rounded below a) the level ±1 is |w| − |â| <= |a − â|
    # away. The ratio w/â rounds once (it can pick a level up to 2u|w| worse) and â·level
    # once (u|â|).
    atol = np.maximum(_quantize.NF4_HALF_GAP * np.abs(scales), np.abs(absmax - scales))
    atol = atol + tol.dot_error(2 * np.abs(w) + np.abs(scales), 1)
    tol.assert_close(back, w, atol, "nf4")
    assert not tol.close(back, w, atol / 4)  # the bound is not loose by 4x


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


def test_an_adapted_stacked_kernel_is_quantized_per_layer():
    # Beside the factors, the kernel's scale leaf (3,) has one axis; the layout still comes
    # from the base's leaves (W stacked over 3 layers), so each layer has its own blocks.
    config = lj.LoraConfig(2, 4, "kernel")
    quantize = jax.jit(
        lambda w: lj.quantize(lj.init(jax.random.key(0), {"proj": {"kernel": w}}, config), "nf4")
    )
    q = quantize(W)["proj"]["kernel"]
    expected = _quantized("nf4")
    assert q.data.shape == expected.data.shape == (3, 40, 32)
    np.testing.assert_array_equal(q.data, expected.data)  # one computation, same input
