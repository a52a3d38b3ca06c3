"""Grouped-query attention kernels behind one function, `attend`.

Shape letters: B batch, L queries, S key slots (L, or the cache length when decoding), N query
heads, K key/value heads, G = N // K, H head_dim; in the blocked kernel Q query blocks of bq
queries and C key blocks of bk keys.

Which key slots a query sees is given by `Visibility` (segment ids and the query offset), not
by a dense (B, L, S) mask: at L = S = 8,192 such a mask alone is 64 Mi entries per row. The
implementations:

* "reference": the scores (B, K, G, L, S) in one piece, softmax in float32. Fastest for short
  sequences; memory grows as L·S.
* "chunked": flash attention in JAX: an online softmax over key blocks for each query block,
  and a `jax.custom_vjp` whose backward recomputes each block's scores from the saved output
  and per-row logsumexp. No array has more than bq × bk scores, forward or backward; blocks
  that no query of the block may see are skipped (`lax.cond`), about half of them when causal.
* "splash": TPU's Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`),
  for self-attention without a cache (L = S, a multiple of 128): causal and segment ids in the
  kernel, one multi-query kernel per key/value head (its G query heads share it), q scaled by
  H^-½ first. Under a mesh (the caller's `jax.sharding.use_abstract_mesh`) it runs in a
  `shard_map`: rows over the mesh axes of the logical rule ``activation_batch``, heads over
  those of ``activation_heads`` when the kv heads divide evenly (else whole on each device).
  Padding queries (segment 0) differ from the other kernels: splash lets them see the earlier
  padding keys (same segment) rather than nothing; no real query sees a padding key, so real
  rows, and everything computed from them, are the same. XLA's cost analysis does not count
  a Pallas kernel's FLOPs (`lora-jax plan` adds them from the formula).
* "auto": on a TPU mesh (or a TPU default backend) "splash" where it applies; otherwise
  "chunked" once L·S reaches `AUTO_CHUNKED_FROM`², else "reference" (no cuDNN kernel is
  wired in: nothing here can check one). Compiled for TPU v5e:2x2 via libtpu, Llama-3.1-8B's
  attention (N=32, K=8, H=128, bfloat16) at L = 8,192, forward and backward, one row per
  chip, needs 0.19 GiB of temporaries per chip with splash, 0.25 GiB with "chunked", 12.1 GiB
  with the reference (`python -m benchmarks.attention --tpu v5e:2x2`).

A query that sees no key (padding: segment 0) gets the uniform distribution over all S slots in
both, as the reference's softmax of all-equal scores gives: a finite output (the mean of the
values) whose gradient reaches the values only.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("auto", "reference", "chunked", "splash")

# "auto" switches to "chunked" when L·S >= AUTO_CHUNKED_FROM². Measured with
# `python -m benchmarks.attention` (forward + backward, B=1, N=8, K=2, H=64, float32, causal)
# on a 2-core x86 CPU: the reference is faster up to L = 512 (chunked takes 2.0x as long at
# 256 and 512, where one block holds the whole sequence and the backward recomputes the
# scores); chunked is faster from L = 1,024 on (1.5x at 1,024, 3.0x at 2,048, 3.3x at 4,096,
# with 45 / 53 / 67 MiB of XLA temporaries against the reference's 102 / 396 / 1,560 MiB).
AUTO_CHUNKED_FROM = 1024

# splash's sequence block: L must divide by it (the kernel's tiles are 128 rows); blocks of up
# to SPLASH_MAX_BLOCK (MaxText's default, 512) are used where L divides by them
SPLASH_BLOCK = 128
SPLASH_MAX_BLOCK = 512

# Block sizes of the chunked kernel: each step holds B·N·bq·bk float32 scores.
BLOCK_Q = 512
BLOCK_K = 512

_MASKED = float(jnp.finfo(jnp.float32).min)


class Visibility(NamedTuple):
    """Which key slots each query may see, without materialising (B, L, S).

    Query i sits at key slot `query_offset + i` (the cache fill when decoding, else 0); it sees
    slot j iff j <= that (causal) and both are in the same segment, a non-zero one (segment 0
    marks invalid keys, and a query of segment 0 sees nothing).

    query_segment_BxL: int32 (B, L). key_segment_BxS: int32 (B, S). query_offset: int32 ().
    """

    query_segment_BxL: jax.Array
    key_segment_BxS: jax.Array
    query_offset: jax.Array | int

    def dense(self) -> jax.Array:
        """bool (B, L, S): the whole mask (what the reference kernel uses)."""
        L, S = self.query_segment_BxL.shape[1], self.key_segment_BxS.shape[1]
        return _visible(
            self.query_segment_BxL,
            self.key_segment_BxS,
            self.query_offset + jnp.arange(L),
            jnp.arange(S),
        )


def visibility(
    query_segment_BxL: jax.Array, key_segment_BxS: jax.Array, query_offset: jax.Array | int
) -> Visibility:
    """The `Visibility` of these segment ids (any integer dtype) and query offset."""
    return Visibility(
        jnp.asarray(query_segment_BxL, jnp.int32),
        jnp.asarray(key_segment_BxS, jnp.int32),
        jnp.asarray(query_offset, jnp.int32),
    )


def _visible(query_segment_BxL, key_segment_BxS, query_slot_L, key_slot_S) -> jax.Array:
    """bool (B, L, S): causal, same segment, and a non-zero one (see `Visibility`)."""
    causal_LxS = key_slot_S[None, :] <= query_slot_L[:, None]
    key_segment_Bx1xS = key_segment_BxS[:, None, :]
    same_BxLxS = query_segment_BxL[:, :, None] == key_segment_Bx1xS
    return causal_LxS[None] & same_BxLxS & (key_segment_Bx1xS != 0)


def platform() -> str:
    """The platform attention compiles for: the mesh in context's (`lora-jax plan` traces
    for a TPU topology on a CPU host), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def splash_applies(queries: int, keys: int) -> bool:
    """Whether "splash" can run these scores: self-attention (no cache) in 128-blocks."""
    return queries == keys and queries % SPLASH_BLOCK == 0


def resolve(implementation: str, queries: int, keys: int) -> str:
    """The kernel `implementation` runs as for `queries` × `keys` scores ("auto" decided)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; expected one of "
            f"{IMPLEMENTATIONS}"
        )
    if implementation == "splash":
        if platform() != "tpu" or not splash_applies(queries, keys):
            raise ValueError(
                f"attention='splash' is TPU's kernel for self-attention of a multiple of "
                f"{SPLASH_BLOCK} tokens; here the platform is {platform()} and the scores "
                f"{queries} x {keys}; use attention='auto' (it picks splash where it applies)"
            )
        return "splash"
    if implementation != "auto":
        return implementation
    if platform() == "tpu" and splash_applies(queries, keys):
        return "splash"
    return "chunked" if queries * keys >= AUTO_CHUNKED_FROM**2 else "reference"


def attend(
    q_BxLxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    visible: Visibility,
    implementation: str = "auto",
) -> jax.Array:
    """Grouped-query attention where `visible` allows; returns (B, L, N, H) in q's dtype.

    `implementation`: one of `IMPLEMENTATIONS` (see the module docstring).
    """
    kernel = resolve(implementation, q_BxLxNxH.shape[1], k_BxSxKxH.shape[1])
    if kernel == "reference":
        return reference(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, visible)
    if kernel == "splash":
        return splash(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, visible)
    return chunked(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, visible)


def reference(
    q_BxLxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, visible: Visibility
) -> jax.Array:
    """Attention with the scores (B, K, G, L, S) in one piece; softmax in float32."""
    B, L, N, H = q_BxLxNxH.shape
    K = k_BxSxKxH.shape[2]
    q_BxLxKxGxH = q_BxLxNxH.reshape(B, L, K, N // K, H) * jnp.asarray(H**-0.5, q_BxLxNxH.dtype)
    scores_BxKxGxLxS = jnp.einsum(
        "blkgh,bskh->bkgls", q_BxLxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
    )
    visible_Bx1x1xLxS = visible.dense()[:, None, None]
    scores_BxKxGxLxS = jnp.where(visible_Bx1x1xLxS, scores_BxKxGxLxS, _MASKED)
    probs_BxKxGxLxS = jax.nn.softmax(scores_BxKxGxLxS, axis=-1).astype(v_BxSxKxH.dtype)
    out_BxLxKxGxH = jnp.einsum("bkgls,bskh->blkgh", probs_BxKxGxLxS, v_BxSxKxH)
    return out_BxLxKxGxH.reshape(B, L, N, H)


def chunked(
    q_BxLxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    visible: Visibility,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> jax.Array:
    """Flash attention: queries in blocks of at most `block_q`, keys of at most `block_k`.

    L and S need not divide by the blocks: they are split into equal blocks and padded with
    segment 0 (invisible), which is sliced off again.
    """
    B, L, N, H = q_BxLxNxH.shape
    K = k_BxSxKxH.shape[2]
    q_BxLxKxGxH = q_BxLxNxH.reshape(B, L, K, N // K, H)
    out_BxLxKxGxH = _flash(
        _blocking(L, block_q),
        _blocking(k_BxSxKxH.shape[1], block_k),
        q_BxLxKxGxH,
        k_BxSxKxH,
        v_BxSxKxH,
        visible.query_segment_BxL,
        visible.key_segment_BxS,
        jnp.asarray(visible.query_offset, jnp.int32),
    )
    return out_BxLxKxGxH.reshape(B, L, N, H)


def splash(
    q_BxLxNxH: jax.Array,
    k_BxLxKxH: jax.Array,
    v_BxLxKxH: jax.Array,
    visible: Visibility,
    interpret: bool = False,
) -> jax.Array:
    """TPU's splash attention (see the module docstring); `interpret` runs the Pallas kernel
    in its interpreter (any platform: how the tests check it on CPU)."""
    B, L, N, H = q_BxLxNxH.shape
    K = k_BxLxKxH.shape[2]
    kernel = _splash_kernel(L, N // K, interpret)

    def local(q_bxLxNxH, k_bxLxKxH, v_bxLxKxH, qseg_bxL, kseg_bxL):
        b, k = q_bxLxNxH.shape[0], k_bxLxKxH.shape[2]  # this device's rows and kv heads
        q_bxKxGxLxH = q_bxLxNxH.reshape(b, L, k, N // K, H).transpose(0, 2, 3, 1, 4)
        q_bxKxGxLxH = q_bxKxGxLxH * jnp.asarray(H**-0.5, q_bxLxNxH.dtype)
        k_bxKxLxH, v_bxKxLxH = k_bxLxKxH.transpose(0, 2, 1, 3), v_bxLxKxH.transpose(0, 2, 1, 3)

        def one_head(q_GxLxH, k_LxH, v_LxH, qseg_L, kseg_L):
            return kernel(q_GxLxH, k_LxH, v_LxH, segment_ids=_segment_ids(qseg_L, kseg_L))

        per_row = jax.vmap(one_head, in_axes=(0, 0, 0, None, None))  # over the kv heads
        out_bxKxGxLxH = jax.vmap(per_row)(q_bxKxGxLxH, k_bxKxLxH, v_bxKxLxH, qseg_bxL, kseg_bxL)
        return out_bxKxGxLxH.transpose(0, 3, 1, 2, 4).reshape(b, L, k * (N // K), H)

    args = (q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, visible.query_segment_BxL, visible.key_segment_BxS)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(*args)
    batch, heads = nn.logical_to_mesh_axes(("activation_batch", "activation_heads"))
    if K % _size(mesh, heads):
        heads = None  # kv heads that do not split evenly stay whole
    rows, split_heads = P(batch), P(batch, None, heads)
    return jax.shard_map(  # a Pallas call is not partitioned by XLA: each device its part
        local,
        mesh=mesh,
        in_specs=(split_heads, split_heads, split_heads, rows, rows),
        out_specs=split_heads,
        check_vma=False,
    )(*args)


def _size(mesh, axes) -> int:
    """Devices along mesh `axes` (a name, a tuple of names, or None)."""
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[name] for name in names)


def _segment_ids(query_segment_L: jax.Array, key_segment_L: jax.Array):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel

    return splash_attention_kernel.SegmentIds(q=query_segment_L, kv=key_segment_L)


@functools.lru_cache(maxsize=32)
def _splash_kernel(length: int, group: int, interpret: bool):
    """The causal multi-query splash kernel of `group` query heads over `length` tokens
    (imported on use: Pallas's TPU modules are not needed elsewhere)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernels,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = next(b for b in (SPLASH_MAX_BLOCK, 256, SPLASH_BLOCK) if length % b == 0)
    blocks = kernels.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    causal = masks.MultiHeadMask([masks.CausalMask((length, length))] * group)
    return kernels.make_splash_mqa_single_device(causal, block_sizes=blocks, interpret=interpret)


def _blocking(length: int, block: int) -> tuple[int, int]:
    """(number of blocks, block size): the fewest blocks of at most `block`, evened out."""
    count = -(-length // block)
    return count, -(-length // count)


def _pad_blocks(x, count: int, size: int):
    """x (B, length, ...) zero-padded to count·size along axis 1, as (count, B, size, ...)."""
    pad = count * size - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], count, size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unblock(x_QxBxbqx, length: int):
    """(Q, B, bq, ...) -> (B, length, ...): the inverse of `_pad_blocks`."""
    x = jnp.moveaxis(x_QxBxbqx, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _block_scores(q_Bxbqx_KxGxH, k_BxbkxKxH, visible_Bxbqxbk):
    """float32 (B, K, G, bq, bk): q·k with invisible pairs at the float32 minimum."""
    s_BxKxGxbqxbk = jnp.einsum(
        "bqkgh,bskh->bkgqs", q_Bxbqx_KxGxH, k_BxbkxKxH, preferred_element_type=jnp.float32
    )
    return jnp.where(visible_Bxbqxbk[:, None, None], s_BxKxGxbqxbk, _MASKED)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(q_blocks, k_blocks, q_BxLxKxGxH, k_BxSxKxH, v_BxSxKxH, qseg_BxL, kseg_BxS, offset):
    return _flash_forward(
        q_blocks, k_blocks, q_BxLxKxGxH, k_BxSxKxH, v_BxSxKxH, qseg_BxL, kseg_BxS, offset
    )[0]


def _flash_forward(
    q_blocks, k_blocks, q_BxLxKxGxH, k_BxSxKxH, v_BxSxKxH, qseg_BxL, kseg_BxS, offset
):
    """(out (B, L, K, G, H) in q's dtype, lse (Q, B, K, G, bq) float32: each row's logsumexp of
    its visible scores, +inf for a row that sees no key)."""
    (Q, bq), (C, bk) = q_blocks, k_blocks
    L, H = q_BxLxKxGxH.shape[1], q_BxLxKxGxH.shape[-1]
    scale = jnp.asarray(H**-0.5, q_BxLxKxGxH.dtype)
    q_QxBxbqxKxGxH = _pad_blocks(q_BxLxKxGxH * scale, Q, bq)
    qseg_QxBxbq = _pad_blocks(qseg_BxL, Q, bq)
    k_CxBxbkxKxH, v_CxBxbkxKxH = _pad_blocks(k_BxSxKxH, C, bk), _pad_blocks(v_BxSxKxH, C, bk)
    kseg_CxBxbk = _pad_blocks(kseg_BxS, C, bk)
    B, _, K, G, _ = q_BxLxKxGxH.shape

    def query_block(_, xs):
        q_BxbqxKxGxH, qseg_Bxbq, i = xs
        query_slot_bq = offset + i * bq + jnp.arange(bq)

        def key_block(carry, ys):
            k_BxbkxKxH, v_BxbkxKxH, kseg_Bxbk, j = ys
            visible_Bxbqxbk = _visible(qseg_Bxbq, kseg_Bxbk, query_slot_bq, j * bk + jnp.arange(bk))

            def update(carry):
                m_BxKxGxbq, l_BxKxGxbq, acc_BxKxGxbqxH = carry
                s = _block_scores(q_BxbqxKxGxH, k_BxbkxKxH, visible_Bxbqxbk)
                m_new = jnp.maximum(m_BxKxGxbq, s.max(-1))
                p = jnp.where(visible_Bxbqxbk[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
                rescale = jnp.exp(m_BxKxGxbq - m_new)
                pv = jnp.einsum(
                    "bkgqs,bskh->bkgqh",
                    p.astype(v_BxbkxKxH.dtype),
                    v_BxbkxKxH,
                    preferred_element_type=jnp.float32,
                )
                return (
                    m_new,
                    l_BxKxGxbq * rescale + p.sum(-1),
                    acc_BxKxGxbqxH * rescale[..., None] + pv,
                )

            return jax.lax.cond(visible_Bxbqxbk.any(), update, lambda c: c, carry), None

        init = (
            jnp.full((B, K, G, bq), _MASKED, jnp.float32),
            jnp.zeros((B, K, G, bq), jnp.float32),
            jnp.zeros((B, K, G, bq, H), jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(
            key_block, init, (k_CxBxbkxKxH, v_CxBxbkxKxH, kseg_CxBxbk, jnp.arange(C))
        )
        seen = l > 0
        out_BxKxGxbqxH = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return None, (jnp.einsum("bkgqh->bqkgh", out_BxKxGxbqxH), lse)

    _, (out_QxBxbqxKxGxH, lse_QxBxKxGxbq) = jax.lax.scan(
        query_block, None, (q_QxBxbqxKxGxH, qseg_QxBxbq, jnp.arange(Q))
    )
    out_BxLxKxGxH = _unblock(out_QxBxbqxKxGxH, L)
    # A row that sees no key: the uniform distribution over all S slots, as in `reference`.
    blind_BxLx1x1x1 = jnp.isinf(_unblock(jnp.moveaxis(lse_QxBxKxGxbq, -1, 2), L))[..., :1, :1, None]
    mean_v_Bx1xKx1xH = v_BxSxKxH.astype(jnp.float32).mean(1)[:, None, :, None, :]
    out_BxLxKxGxH = jnp.where(blind_BxLx1x1x1, mean_v_Bx1xKx1xH, out_BxLxKxGxH)
    return out_BxLxKxGxH.astype(q_BxLxKxGxH.dtype), lse_QxBxKxGxbq


def _flash_fwd(q_blocks, k_blocks, q, k, v, qseg, kseg, offset):
    out, lse = _flash_forward(q_blocks, k_blocks, q, k, v, qseg, kseg, offset)
    return out, (q, k, v, qseg, kseg, offset, out, lse)


def _flash_bwd(q_blocks, k_blocks, residuals, dout_BxLxKxGxH):
    """FlashAttention-2's backward: per key block, over the query blocks, recompute
    p = exp(s − lse), then dv += pᵀ·do, ds = p·(do·vᵀ − rowsum(do·out)), dq += ds·k, dk += dsᵀ·q."""
    q_BxLxKxGxH, k_BxSxKxH, v_BxSxKxH, qseg_BxL, kseg_BxS, offset, out_BxLxKxGxH, lse = residuals
    (Q, bq), (C, bk) = q_blocks, k_blocks
    B, L, K, G, H = q_BxLxKxGxH.shape
    S = k_BxSxKxH.shape[1]
    scale = jnp.asarray(H**-0.5, q_BxLxKxGxH.dtype)
    dout_f32 = dout_BxLxKxGxH.astype(jnp.float32)
    delta_BxLxKxG = jnp.sum(dout_f32 * out_BxLxKxGxH.astype(jnp.float32), -1)
    q_QxBxbqxKxGxH = _pad_blocks(q_BxLxKxGxH * scale, Q, bq)
    do_QxBxbqxKxGxH = _pad_blocks(dout_BxLxKxGxH, Q, bq)
    delta_QxBxKxGxbq = jnp.moveaxis(_pad_blocks(delta_BxLxKxG, Q, bq), 2, -1)
    qseg_QxBxbq = _pad_blocks(qseg_BxL, Q, bq)
    k_CxBxbkxKxH, v_CxBxbkxKxH = _pad_blocks(k_BxSxKxH, C, bk), _pad_blocks(v_BxSxKxH, C, bk)
    kseg_CxBxbk = _pad_blocks(kseg_BxS, C, bk)

    def key_block(dq_QxBxbqxKxGxH, xs):
        k_BxbkxKxH, v_BxbkxKxH, kseg_Bxbk, j = xs
        key_slot_bk = j * bk + jnp.arange(bk)

        def query_block(carry, ys):
            q_BxbqxKxGxH, do_BxbqxKxGxH, lse_BxKxGxbq, delta_BxKxGxbq, dq_BxbqxKxGxH, qseg, i = ys
            visible_Bxbqxbk = _visible(
                qseg, kseg_Bxbk, offset + i * bq + jnp.arange(bq), key_slot_bk
            )

            def update(args):
                (dk_BxbkxKxH, dv_BxbkxKxH), dq_BxbqxKxGxH = args
                s = _block_scores(q_BxbqxKxGxH, k_BxbkxKxH, visible_Bxbqxbk)
                p = jnp.where(
                    visible_Bxbqxbk[:, None, None], jnp.exp(s - lse_BxKxGxbq[..., None]), 0.0
                )
                dv = jnp.einsum(
                    "bkgqs,bqkgh->bskh",
                    p.astype(do_BxbqxKxGxH.dtype),
                    do_BxbqxKxGxH,
                    preferred_element_type=jnp.float32,
                )
                dp = jnp.einsum(
                    "bqkgh,bskh->bkgqs",
                    do_BxbqxKxGxH,
                    v_BxbkxKxH,
                    preferred_element_type=jnp.float32,
                )
                ds = p * (dp - delta_BxKxGxbq[..., None])
                dq = jnp.einsum("bkgqs,bskh->bqkgh", ds, k_BxbkxKxH.astype(jnp.float32))
                dk = jnp.einsum("bkgqs,bqkgh->bskh", ds, q_BxbqxKxGxH.astype(jnp.float32))
                return (dk_BxbkxKxH + dk, dv_BxbkxKxH + dv), dq_BxbqxKxGxH + dq

            carry, dq_BxbqxKxGxH = jax.lax.cond(
                visible_Bxbqxbk.any(), update, lambda a: a, (carry, dq_BxbqxKxGxH)
            )
            return carry, dq_BxbqxKxGxH

        zeros_BxbkxKxH = jnp.zeros((B, bk, K, H), jnp.float32)
        (dk_BxbkxKxH, dv_BxbkxKxH), dq_QxBxbqxKxGxH = jax.lax.scan(
            query_block,
            (zeros_BxbkxKxH, zeros_BxbkxKxH),
            (
                q_QxBxbqxKxGxH,
                do_QxBxbqxKxGxH,
                lse,
                delta_QxBxKxGxbq,
                dq_QxBxbqxKxGxH,
                qseg_QxBxbq,
                jnp.arange(Q),
            ),
        )
        return dq_QxBxbqxKxGxH, (dk_BxbkxKxH, dv_BxbkxKxH)

    dq_QxBxbqxKxGxH, (dk_CxBxbkxKxH, dv_CxBxbkxKxH) = jax.lax.scan(
        key_block,
        jnp.zeros((Q, B, bq, K, G, H), jnp.float32),
        (k_CxBxbkxKxH, v_CxBxbkxKxH, kseg_CxBxbk, jnp.arange(C)),
    )
    dq = _unblock(dq_QxBxbqxKxGxH, L) * scale.astype(jnp.float32)
    dk, dv = _unblock(dk_CxBxbkxKxH, S), _unblock(dv_CxBxbkxKxH, S)
    # Rows that see no key took the mean of all S values: each value gets do/S from them.
    blind_BxLx1x1 = jnp.isinf(_unblock(jnp.moveaxis(lse, -1, 2), L))[..., :1, :1]
    dmean_BxKxH = jnp.where(blind_BxLx1x1[..., None], dout_f32, 0.0).sum((1, 3)) / S
    dv = dv + dmean_BxKxH[:, None]
    return (
        dq.astype(q_BxLxKxGxH.dtype),
        dk.astype(k_BxSxKxH.dtype),
        dv.astype(v_BxSxKxH.dtype),
        None,
        None,
        None,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)
