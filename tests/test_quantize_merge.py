"""lj.merge into a quantized base (`lj.quantize`): dequantise → add s·A·B → requantise in the
same format, within the format's bound of the exact dequant(W) + ΔW; `lj.merge_error`
reports that error; `lj.unmerge` refuses a quantized weight.

The bounds use only the exact merged weight V = dequant(W) + s·A·B (float64) and the format's
definition (lora_jax/_quantize.py), not the stored scales of the result."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import _quantize

import tolerances as tol

RANK = 4
SHAPES = {"up": (128, 48), "down": (48, 32)}  # fan_in x fan_out of two kernels


@functools.cache
def _quantized_adapted(fmt: str):
    """Two adapted kernels (B != 0) with `fmt` bases, made once per format (jitted)."""
    rng = np.random.default_rng(0)
    base = {
        k: {"kernel": jnp.asarray(rng.standard_normal(s, np.float32))} for k, s in SHAPES.items()
    }

    def make(params):
        adapted = lj.init(jax.random.key(1), params, lj.LoraConfig(RANK, 8, "kernel"))
        for name in SHAPES:  # B ~ N(0, 1): ΔW of the size of W, far past the formats' errors
            layer = adapted[name]
            layer["kernel_lora_b"] = jax.random.normal(
                jax.random.key(2), layer["kernel_lora_b"].shape
            )
        return lj.quantize(adapted, fmt, "kernel")

    return jax.jit(make)(base)


def _exact(params, name):
    """(V = dequant(W) + s·A·B in float64, its float32 rounding bound) for kernel `name`."""
    layer = params[name]
    w = np.asarray(layer["kernel"].dequantize(jnp.float32), np.float64)
    a, b, s = (
        np.asarray(layer["kernel" + k], np.float64) for k in ("_lora_a", "_lora_b", "_lora_scale")
    )
    # merge's float32 V: the rank-r sum, ·s and + W, each rounding once (tolerances.py).
    rounding = tol.dot_error(np.abs(w) + np.abs(s) * (np.abs(a) @ np.abs(b)), RANK + 2)
    return w + s * (a @ b), rounding


def _nf4_bound(v, block_size=64):
    """Per element of V (fan_in, fan_out): NF4_HALF_GAP·â ∨ |a − â| (the module docstring),
    with â <= a + g/2 and g/2 <= max a / 254: at most HALF_GAP·a + (HALF_GAP + 1)·max a / 254,
    a each block's absmax of V."""
    flat = np.abs(v).reshape(-1)
    blocks = np.pad(flat, (0, -flat.size % block_size)).reshape(-1, block_size).max(-1)
    a = np.repeat(blocks, block_size)[: flat.size].reshape(v.shape)
    half = _quantize.NF4_HALF_GAP
    return half * a + (half + 1) * blocks.max() / 254


def _int8_bound(v):
    """Half a step of each output channel: max_in |V| / 254."""
    return np.abs(v).max(axis=0, keepdims=True) / 254


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_merge_requantises_within_the_formats_bound_of_the_exact_sum(fmt):
    params = _quantized_adapted(fmt)
    merged = jax.jit(lj.merge)(params)
    errors = jax.jit(lj.merge_error)(params)
    assert set(errors) == {f"{name}/kernel" for name in SHAPES}
    for name in SHAPES:
        kernel = merged[name]["kernel"]
        assert set(merged[name]) == {"kernel"}  # the LoRA leaves are gone
        assert isinstance(kernel, lj.QuantizedArray) and kernel.fmt == fmt
        assert kernel.block_size == params[name]["kernel"].block_size
        v, rounding = _exact(params, name)
        back = np.asarray(kernel.dequantize(jnp.float32), np.float64)
        format_bound = _nf4_bound(v) if fmt == "nf4" else _int8_bound(v)
        # The format's error on the float32 V, which is `rounding` from the exact V (its
        # absmax too, hence the bound of V plus `rounding`'s largest), and dequantisation's
        # own roundings: the ratio (2u|V|) and scale · level (u|V|, one more for the scale).
        atol = format_bound + 2 * rounding.max() + tol.dot_error(np.abs(v) + format_bound, 4)
        tol.assert_close(back, v, atol, f"{fmt} {name}")
        measured = float(np.max(np.abs(back - v)))
        # merge_error measures the same difference in float32 (V's rounding apart).
        assert abs(float(errors[f"{name}/kernel"]) - measured) <= rounding.max() + tol.dot_error(
            np.abs(v).max(), 2
        )
        assert 0 < float(errors[f"{name}/kernel"]) <= atol.max()


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_materialize_of_a_quantized_base_is_the_plain_dequantised_sum(fmt):
    params = _quantized_adapted(fmt)
    plain = jax.jit(lj.materialize)(params)
    for name in SHAPES:
        v, rounding = _exact(params, name)
        assert not isinstance(plain[name]["kernel"], lj.QuantizedArray)
        tol.assert_close(plain[name]["kernel"], v, rounding, name)


def test_unmerge_refuses_a_quantized_weight():
    params = _quantized_adapted("nf4")
    merged = jax.jit(lj.merge)(params)
    with pytest.raises(ValueError, match="/kernel: a quantized weight cannot be unmerged"):
        lj.unmerge(merged, lj.adapter(params))


def test_merge_error_is_empty_without_a_quantized_adapted_weight():
    params = {"dense": {"kernel": jnp.ones((4, 3))}}
    adapted = lj.init(jax.random.key(0), params, lj.LoraConfig(2, 4, "kernel"))
    assert lj.merge_error(adapted) == {}
