"""models.attention: the chunked (flash) kernel computes the reference kernel's attention and
gradients (padding, packing, GQA, causal, a query offset into a KV cache; float32 and
bfloat16), a model gives the same logits and generations with either, and the gradient of a
model's loss at L = 8,192 holds no L×S array with the chunked kernel (the reference's does)."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import models
from models import attention

import tolerances as tol

# Small blocks, so that the kernel runs several query and key blocks, blocks it skips (above
# the diagonal, other segments) and padded last blocks (37 = 5 blocks of 8 padded to 40).
BLOCK_Q, BLOCK_K = 8, 5
N, K, H = 4, 2, 8  # G = 2 query heads per key/value head
ROUNDINGS_BF16 = 3  # per side, forward: scale·q, p cast for p·v, and the output


def _case(name):
    """(L, S, query segments (B, L), key segments (B, S), query offset)."""
    if name == "packed":  # two examples and right padding; a row with left padding
        L = 37
        segments = np.array([[1] * 10 + [2] * 20 + [0] * 7, [0] * 5 + [3] * 32])
        return L, L, segments, segments, 0
    if name == "decode":  # 3 new tokens after 10 cached ones; key slots past 13 not written yet
        L, S, offset = 3, 20, 10
        keys = np.array([[1] * 13 + [0] * 7, [0] * 4 + [1] * 9 + [0] * 7])  # row 1 left-padded
        return L, S, np.ones((2, L), int), keys, offset
    raise ValueError(name)


def _inputs(L, S, dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, L, N, H)).astype(dtype)
    k = jax.random.normal(keys[1], (2, S, K, H)).astype(dtype)
    v = jax.random.normal(keys[2], (2, S, K, H)).astype(dtype)
    w = jax.random.normal(keys[3], (2, L, N, H)).astype(dtype)  # the loss's cotangent
    return q, k, v, w


def _kernels(visible):
    return {
        "reference": lambda q, k, v: attention.reference(q, k, v, visible),
        "chunked": lambda q, k, v: attention.chunked(q, k, v, visible, BLOCK_Q, BLOCK_K),
    }


def _forward_atol(q, k, v, dtype) -> float:
    """The bound on |chunked − reference| for the attention output.

    A score s = (H^-½·q)·k, accumulated in float32 over H, is within
    δ = (γ_H + γ_1[dtype]·[bf16]) · H^-½·max(|q|·|k|) of exact (the bf16 term: the one rounding
    of H^-½·q). p = exp(s − m)/Σ exp(s − m) then carries a relative error of at most 2δ (its
    numerator and its normaliser) plus γ_{S + ELEMENTWISE} (the normaliser's sum, exp); out =
    Σ p·v adds γ_S in float32 and, in bfloat16, the roundings of p and of out. Each relative to
    Σ p·|v| <= max|v|. Both kernels are within that of the exact value: twice it apart.
    """
    q64, k64 = (np.abs(np.asarray(x, np.float64)) for x in (q, k))
    B, L, _, _ = q64.shape
    S = k64.shape[1]
    qk = np.einsum("blkgh,bskh->bkgls", q64.reshape(B, L, K, N // K, H), k64).max() * H**-0.5
    bf16 = dtype == jnp.bfloat16
    delta = (tol.gamma(H) + (tol.gamma(1, ml_dtypes.bfloat16) if bf16 else 0.0)) * qk
    relative = 2 * delta + tol.gamma(2 * S + tol.ELEMENTWISE)
    if bf16:
        relative += tol.gamma(ROUNDINGS_BF16 - 1, ml_dtypes.bfloat16)
    return 2 * relative * tol.scale_of(v)


def _grad_atol(forward_atol_value, v, expected, S, dtype) -> float:
    """The bound on |chunked − reference| for a gradient: tolerances.py's chain rule, the
    forward chain (the relative error of `_forward_atol`, in units of γ) and the backward pass
    through it (the same reductions, transposed, plus the weight gradient's sum over S),
    at the gradient's own scale."""
    relative = forward_atol_value / (2 * tol.scale_of(v))
    n = tol.grad_depth(int(np.ceil(relative / tol.unit_roundoff())), S)
    atol = tol.chain_atol(n, tol.scale_of(expected))
    if dtype == jnp.bfloat16:  # twice the forward's roundings (grad_depth's rule), in bf16
        atol += tol.chain_atol(2 * ROUNDINGS_BF16, tol.scale_of(expected), ml_dtypes.bfloat16)
    return atol


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", ["packed", "decode"])
def test_chunked_matches_the_reference(case, dtype):
    L, S, query_segments, key_segments, offset = _case(case)
    q, k, v, w = _inputs(L, S, dtype)
    visible = attention.visibility(query_segments, key_segments, offset)
    results = {}
    for name, kernel in _kernels(visible).items():
        out = jax.jit(kernel)(q, k, v)
        grads = jax.jit(
            jax.grad(
                lambda q, k, v, kernel=kernel: jnp.sum((kernel(q, k, v) * w).astype(jnp.float32)),
                argnums=(0, 1, 2),
            )
        )(q, k, v)
        assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
        results[name] = (out, grads)
    (out_ref, grads_ref), (out_chunked, grads_chunked) = results["reference"], results["chunked"]

    forward = _forward_atol(q, k, v, dtype)
    tol.assert_close(out_chunked, out_ref, forward, "output")
    for what, got, expected in zip("qkv", grads_chunked, grads_ref, strict=True):
        tol.assert_close(got, expected, _grad_atol(forward, v, expected, S, dtype), f"d{what}")


def test_a_query_that_sees_no_key_averages_all_values_and_passes_no_gradient_to_q_or_k():
    """As the reference's softmax of all-equal scores does: a finite output, the mean of the S
    values (the whole cache, padding included), and zero gradients for its query and for keys
    that only it might see."""
    L, _, segments, _, _ = _case("packed")
    q, k, v, w = _inputs(L, L, jnp.float32)
    visible = attention.visibility(segments, segments, 0)
    chunked = _kernels(visible)["chunked"]
    out = np.asarray(chunked(q, k, v), np.float64)
    blind = segments == 0  # (B, L)
    mean_v = np.asarray(v, np.float64).mean(1)  # (B, K, H)
    expected = np.repeat(mean_v, N // K, axis=1)  # the heads of each kv head
    for b, l in zip(*np.nonzero(blind), strict=True):
        # a mean over S = 37 values: γ_S of their magnitude, on each side
        tol.assert_close(out[b, l], expected[b], tol.chain_atol(L, tol.scale_of(v)))
    dq, dk, _ = jax.grad(lambda q, k, v: jnp.sum(chunked(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
    assert not np.any(np.asarray(dq)[blind])
    assert not np.any(np.asarray(dk)[blind])  # segment-0 keys: no query sees them


def test_a_planted_bug_fails_the_tolerance():
    """A scale off by 1% (H^-½ · 1.01) is caught, by far, by the float32 forward bound."""
    L, S, segments, keys, offset = _case("packed")
    q, k, v, _ = _inputs(L, S, jnp.float32)
    visible = attention.visibility(segments, keys, offset)
    expected = attention.reference(q, k, v, visible)
    assert not tol.close(
        attention.chunked(q * 1.01, k, v, visible, BLOCK_Q, BLOCK_K),
        expected,
        _forward_atol(q, k, v, jnp.float32),
    )


def test_auto_picks_by_length_and_unknown_names_are_refused():
    big = attention.AUTO_CHUNKED_FROM
    assert attention.resolve("auto", big, big) == "chunked"
    assert attention.resolve("auto", big - 1, big) == "reference"
    assert attention.resolve("auto", 1, big) == "reference"  # a decode step
    assert attention.resolve("reference", big, big) == "reference"
    with pytest.raises(ValueError, match=r"unknown attention 'flash'.*'auto', 'reference'"):
        models.get_config("tiny-llama", attention="flash")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_splash_matches_the_reference_on_every_real_row(dtype):
    """TPU's splash kernel, run by Pallas's interpreter on this CPU: 256 tokens (two of its
    128-blocks), two packed examples and right padding, G = 2 query heads per kv head. The
    padding rows attend among themselves in splash (see models/attention.py), so they carry
    no cotangent, as a masked loss gives them none; everything else equals the reference
    within the bound `_forward_atol` derives (softmax by blocks is what both compute)."""
    L = 256
    segments = np.array([[1] * 100 + [2] * 120 + [0] * 36, [3] * 256])
    q, k, v, w = _inputs(L, L, dtype)
    real = jnp.asarray(segments != 0)[:, :, None, None]
    w = jnp.where(real, w, 0)
    visible = attention.visibility(segments, segments, 0)
    kernels = {
        "reference": lambda q, k, v: attention.reference(q, k, v, visible),
        "splash": lambda q, k, v: attention.splash(q, k, v, visible, interpret=True),
    }
    results = {}
    for name, kernel in kernels.items():

        def loss(q, k, v, kernel=kernel):
            return jnp.sum((kernel(q, k, v) * w).astype(jnp.float32))

        results[name] = (jnp.where(real, kernel(q, k, v), 0), jax.grad(loss, (0, 1, 2))(q, k, v))
    (out_ref, grads_ref), (out_splash, grads_splash) = results["reference"], results["splash"]
    forward = _forward_atol(q, k, v, dtype)
    tol.assert_close(out_splash, out_ref, forward, "output")
    for what, got, expected in zip("qkv", grads_splash, grads_ref, strict=True):
        tol.assert_close(got, expected, _grad_atol(forward, v, expected, L, dtype), f"d{what}")
    # the check can fail: a kernel without the segment ids lets example 2 see example 1
    unsegmented = attention.visibility(np.ones_like(segments), np.ones_like(segments), 0)
    wrong = jnp.where(real, attention.splash(q, k, v, unsegmented, interpret=True), 0)
    assert not tol.close(wrong, out_ref, forward)


@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")
def test_auto_runs_splash_in_the_model_compiled_for_a_tpu_mesh():
    """With the TPU compiler (libtpu, no TPU), a tiny Llama's loss gradient on a v5e:2x2 mesh
    (the batch over 4 chips): "auto" compiles splash's Mosaic kernel into the step at 128
    tokens and the chunked kernel at 64 (not a multiple of 128); "splash" off TPU is refused."""
    from train.mesh import AXES, with_activation_rules
    from train.plan import tpu_target

    target = tpu_target("v5e:2x2")
    mesh = jax.sharding.Mesh(np.array(target.devices).reshape(4, 1, 1), AXES)
    model, params = _model_and_params("auto", max_position_embeddings=128)
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    hlo = {}
    for L in (128, 64):

        def loss(params, ids):
            return jnp.mean(model.apply({"params": params}, ids, segment_ids=jnp.ones_like(ids)))

        step = with_activation_rules(jax.grad(loss), mesh)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), params
        )
        ids = jax.ShapeDtypeStruct((4, L), jnp.int32, sharding=shard)
        hlo[L] = jax.jit(step).lower(abstract, ids).compile().as_text()
    assert "tpu_custom_call" in hlo[128] and "tpu_custom_call" not in hlo[64]
    with pytest.raises(ValueError, match="attention='splash' is TPU's kernel"):
        attention.resolve("splash", 128, 128)  # this process's platform is the CPU


def _model_and_params(attention_kernel, **overrides):
    config = models.get_config("tiny-llama", attention=attention_kernel, **overrides)
    return models.Decoder(config), models.init_params(config, jax.random.key(0))


def test_the_model_gives_the_same_logits_with_either_kernel_with_and_without_the_cache():
    model_ref, params = _model_and_params("reference")
    model_chunked, _ = _model_and_params("chunked")
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 128)
    segment_ids = jnp.array([[1] * 5 + [2] * 6 + [0], [1] * 12])
    mask = segment_ids != 0
    expected = model_ref.apply(
        {"params": params}, ids, attention_mask=mask, segment_ids=segment_ids
    )
    got = model_chunked.apply({"params": params}, ids, attention_mask=mask, segment_ids=segment_ids)
    tol.assert_close(got, expected, tol.logits_atol(model_ref.config, expected, keys=12), "logits")

    # Through the KV cache: a left-padded prompt, then one token at a time.
    prompt_mask = jnp.array([[0, 0, 1, 1, 1, 1], [1] * 6])
    logits = {}
    for name, model in (("reference", model_ref), ("chunked", model_chunked)):
        step = jax.jit(functools.partial(model.apply, decode=True, mutable=["cache"]))
        cache = models.init_cache(model, 2, 8)
        outs = []
        for tokens, step_mask in (
            (ids[:, :6], prompt_mask),
            (ids[:, 6:7], None),
            (ids[:, 7:8], None),
        ):
            out, variables = step({"params": params, "cache": cache}, tokens, step_mask)
            cache = variables["cache"]
            outs.append(out)
        logits[name] = jnp.concatenate(outs, axis=1)
    atol = tol.logits_atol(model_ref.config, logits["reference"], keys=8)
    tol.assert_close(logits["chunked"], logits["reference"], atol, "cached logits")


def _largest_square(jaxpr, length: int) -> tuple[int, ...] | None:
    """The shape of a value with two axes >= `length` anywhere in `jaxpr` (its equations and
    those of every sub-jaxpr: scan, cond, custom_vjp, remat, pjit), or None."""
    for eqn in jaxpr.eqns:
        for var in (*eqn.invars, *eqn.outvars):
            shape = getattr(getattr(var, "aval", None), "shape", ())
            if sum(d >= length for d in shape) >= 2:
                return tuple(shape)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    found = _largest_square(inner, length)
                    if found:
                        return found
    return None


def test_the_gradient_at_8192_tokens_holds_no_length_squared_array():
    """Traced, never run: the jaxpr of a loss's gradient for a tiny Llama at L = 8,192, its
    layers under nn.scan and nn.remat (so the walk goes through scan, remat, cond and the
    custom_vjp's forward and backward)."""
    L = 8192
    shapes = {}
    for kernel in ("reference", "chunked"):
        model, params = _model_and_params(
            kernel, max_position_embeddings=L, remat_policy="full", scan_layers=True
        )
        ids = jnp.zeros((1, L), jnp.int32)

        def loss(params, model=model, ids=ids):
            return jnp.mean(model.apply({"params": params}, ids, segment_ids=jnp.ones_like(ids)))

        shapes[kernel] = _largest_square(jax.make_jaxpr(jax.grad(loss))(params).jaxpr, L)
    assert shapes["reference"] is not None  # the check can fail: the reference's scores
    assert shapes["chunked"] is None, shapes["chunked"]
