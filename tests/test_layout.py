"""lora_jax/_layout.py: which axes are stacked, input and output; factor shapes; flattening."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax import _layout, _tree
from lora_jax._layout import Layout

import tolerances as tol
from flax_fixtures import Attention, EinsumNet, ScannedLM, init_variables


def _flat(model, x):
    return _tree.flatten(init_variables(model, x)["params"])


def _default(flat, path):
    return _layout.default_layout(tuple(path.split("/")), flat)


def test_dense_is_in_out_and_embed_is_vocab_features():
    flat = _flat(ScannedLM(), jnp.zeros((1, 4), jnp.int32))
    assert _default(flat, "embed_tokens/embedding") == Layout(stack=0, fan_in=1)
    assert _layout.fans((56, 24), Layout(0, 1)) == (56, 24)
    assert _layout.factor_shapes((56, 24), Layout(0, 1), 4) == ((56, 4), (4, 24), ())
    assert _layout.factor_shapes((24, 40), Layout(0, 1), 4) == ((24, 4), (4, 40), ())


def test_a_scan_stacks_every_leaf_of_its_block_on_one_leading_axis():
    flat = _flat(ScannedLM(), jnp.zeros((1, 4), jnp.int32))
    assert _default(flat, "layers/up_proj/kernel") == Layout(stack=1, fan_in=1)  # (3, 24, 40)
    assert _layout.split((3, 24, 40), Layout(1, 1)) == ((3,), (24,), (40,))
    assert _layout.fans((3, 24, 40), Layout(1, 1)) == (24, 40)
    assert _layout.factor_shapes((3, 24, 40), Layout(1, 1), 4) == ((3, 24, 4), (3, 4, 40), (3,))
    # Same leading size, but a sibling in the block is not stacked: no stack axis.
    flat = {("m", "kernel"): jnp.zeros((3, 4, 5)), ("n", "kernel"): jnp.zeros((4, 5))}
    assert _layout.default_layout(("m", "kernel"), flat) == Layout(stack=0, fan_in=1)


def test_dense_general_reads_its_input_axes_off_the_bias():
    flat = _flat(Attention(), jnp.ones((2, 5, 24)))
    # q_proj: kernel (embed, heads, head_dim), bias (heads, head_dim)
    assert _default(flat, "q_proj/kernel") == Layout(0, 1)
    # o_proj: kernel (heads, head_dim, embed), bias (embed,)
    assert _default(flat, "o_proj/kernel") == Layout(0, 2)
    assert _layout.split((4, 6, 24), Layout(0, 2)) == ((), (4, 6), (24,))
    assert _layout.fans((4, 6, 24), Layout(0, 2)) == (24, 24)
    assert _layout.fans((24, 4, 6), Layout(0, 1)) == (24, 24)
    assert _layout.factor_shapes((4, 6, 24), Layout(0, 2), 3) == ((4, 6, 3), (3, 24), ())
    no_bias = {("d", "kernel"): jnp.zeros((4, 6, 24)), ("e", "kernel"): jnp.zeros((24, 8))}
    assert _layout.default_layout(("d", "kernel"), no_bias) == Layout(
        0, 1
    )  # DenseGeneral's axis=-1


def test_einsum_with_a_kernel_batch_axis_takes_an_explicit_layout():
    model, x = EinsumNet(), jnp.ones((2, 5, 24))
    flat = _flat(model, x)
    # "bnlg,nge->bnle": n is a batch axis of the kernel (4, 10, 6), which no rule can see.
    assert _default(flat, "per_head/kernel") == Layout(0, 1)
    inferred = lj.infer_layout(model.apply, init_variables(model, x), x)["per_head/kernel"]
    assert inferred == Layout(stack=1, fan_in=1)
    assert _layout.resolve({"per_head/.*": inferred}, ("per_head", "kernel"), flat) == inferred
    assert _layout.split("nge", inferred) == ("n", "g", "e")
    assert _layout.factor_shapes((4, 10, 6), inferred, 2) == ((4, 10, 2), (4, 2, 6), (4,))


def test_split_works_on_specs_and_subscripts():
    spec = (P("fsdp"), None, "tensor")
    assert _layout.split(spec, Layout(1, 1)) == ((P("fsdp"),), (None,), ("tensor",))
    assert _layout.split("abcd", Layout(1, 2)) == ("a", "bc", "d")


def test_resolve_refuses_a_layout_without_an_output_axis():
    flat = {("d", "kernel"): jnp.zeros((4, 6, 24))}
    with pytest.raises(ValueError, match=r"d/kernel: layout .* does not fit .* output axis"):
        _layout.resolve({"d/kernel": Layout(1, 2)}, ("d", "kernel"), flat)
    with pytest.raises(ValueError, match="1 <= fan_in"):
        _layout.resolve({".*": (0, 0)}, ("d", "kernel"), flat)


@pytest.mark.parametrize(
    "w_shape, lay",
    [
        ((24, 40), Layout(0, 1)),
        ((3, 24, 40), Layout(1, 1)),
        ((4, 6, 24), Layout(0, 2)),
        ((24, 4, 6), Layout(0, 1)),
        ((2, 3, 4, 5, 6), Layout(2, 2)),
    ],
)
def test_check_fits_reads_the_layout_back_off_the_factor_shapes(w_shape, lay):
    a, b, s = _layout.factor_shapes(w_shape, lay, 3)
    assert _layout.check_fits("w", w_shape, a, b, s) == lay
    with pytest.raises(ValueError, match=r"w: the adapter does not fit the base weight"):
        _layout.check_fits("w", w_shape, a[:-1] + (4,), b, s)  # ranks of A and B disagree
    with pytest.raises(ValueError, match=r"w: the adapter does not fit"):
        _layout.check_fits("w", w_shape, a, b, s + (1,))
    with pytest.raises(ValueError, match=r"w: the adapter does not fit"):
        _layout.check_fits("w", tuple(n + 1 for n in w_shape), a, b, s)


def test_no_output_axis_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        _layout.check_fits("w", (4, 6), (4, 6, 2), (2,), ())


@pytest.mark.parametrize(
    "w_shape, lay",
    [
        ((24, 40), Layout(0, 1)),
        ((3, 24, 40), Layout(1, 1)),
        ((4, 6, 24), Layout(0, 2)),
        ((2, 3, 4, 5, 6), Layout(2, 2)),
    ],
)
def test_flatten_unflatten_round_trip_is_the_matrix_product(w_shape, lay):
    rank = 3
    a_shape, b_shape, s_shape = _layout.factor_shapes(w_shape, lay, rank)
    ka, kb, ks = jax.random.split(jax.random.key(0), 3)
    a, b = jax.random.normal(ka, a_shape), jax.random.normal(kb, b_shape)
    s = jax.random.uniform(ks, s_shape)
    a_SxIxR, b_SxRxO, s_S = _layout.flatten_factors(a, b, s, lay)
    stack, (fan_in, fan_out) = int(np.prod(w_shape[: lay.stack])), _layout.fans(w_shape, lay)
    assert a_SxIxR.shape == (stack, fan_in, rank) and b_SxRxO.shape == (stack, rank, fan_out)
    assert s_S.shape == (stack,)
    for x, y in zip(_layout.unflatten_factors(a_SxIxR, b_SxRxO, s_S, w_shape, lay), (a, b, s)):
        np.testing.assert_array_equal(x, y)
    # The flat matrix product, reshaped back, is ΔW = s·A·B over the weight's own axes.
    letters = "abcde"[: len(w_shape)]
    stack_sub, in_sub, out_sub = _layout.split(letters, lay)
    direct = jnp.einsum(
        f"{stack_sub}{in_sub}r,{stack_sub}r{out_sub},{stack_sub}->{letters}", a, b, s
    )
    flat_dw = jnp.einsum("sir,sro->sio", a_SxIxR * s_S[:, None, None], b_SxRxO)
    # Two float32 evaluations of s·A·B (rank-r sum, ·s): within 2·γ_{r+1}·|s||A||B| elementwise.
    magnitude = np.einsum(
        "sir,sro->sio",
        np.abs(np.asarray(a_SxIxR, np.float64))
        * np.abs(np.asarray(s_S, np.float64))[:, None, None],
        np.abs(np.asarray(b_SxRxO, np.float64)),
    )
    tol.assert_close(
        flat_dw.reshape(w_shape),
        direct,
        tol.dot_error(magnitude.reshape(w_shape), rank + 1, sides=2),
    )


def test_eligible_leaves_and_factor_dtypes():
    assert _layout.is_matrix(jnp.zeros((2, 3))) and not _layout.is_matrix(jnp.zeros(3))
    assert not _layout.is_matrix(jnp.zeros((2, 3), jnp.int32))
    assert _layout.factor_dtype(jnp.bfloat16) == jnp.float32
    assert _layout.factor_dtype(jnp.float32) == jnp.float32
