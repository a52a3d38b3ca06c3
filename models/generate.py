"""Autoregressive generation with a KV cache: greedy, temperature/top-k/top-p sampling and beam
search, each one jit-compiled `lax.while_loop`.

Shape letters: B batch, K beams, P prompt length, N max_new_tokens, T = P + N, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import lora_jax as lj
from models.decoder import Decoder, init_cache, reorder_cache

# Where a banned n-gram may have occurred: prompt + output, or the output only.
NGRAM_SCOPES = ("sequence", "output")
# Finite "minus infinity" for beam scores, as in transformers (keeps arithmetic NaN-free).
_NEG = -1.0e9


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What shapes the compiled program (static under jit)."""

    max_new_tokens: int
    do_sample: bool
    num_beams: int
    no_repeat_ngram_size: int
    no_repeat_ngram_scope: str


class _Knobs(NamedTuple):
    """Numeric settings, traced so that changing them does not recompile."""

    eos_token_id: jax.Array  # negative: never stop early
    pad_token_id: jax.Array
    temperature: jax.Array
    top_k: jax.Array  # 0: off
    top_p: jax.Array
    length_penalty: jax.Array


def generate(
    model: Decoder,
    params: Any,
    prompt_ids: Any,
    *,
    attention_mask: Any = None,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    no_repeat_ngram_scope: str = "sequence",
    rng: jax.Array | None = None,
    apply_fn: Callable[..., Any] | None = None,
    adapter_ids: Any = None,
) -> jax.Array:
    """Generate up to `max_new_tokens` tokens after each prompt; returns int32 (B, N).

    prompt_ids: int (B, P). attention_mask: (B, P), 1 for real tokens; rows may be left- or
      right-padded (real tokens are moved to the right end before decoding).
    eos_token_id: stops a row (the EOS is kept, later slots hold `pad_token_id`); defaults to
      `model.config.eos_token_id`; a negative id disables stopping. pad_token_id defaults to
      the config's pad id, else the EOS id, else 0.
    Greedy by default; `do_sample=True` samples with `temperature`, `top_k` (0: off) and `top_p`
      (1.0: off) from `rng` (default key 0). `num_beams > 1` runs beam search as in
      transformers (`early_stopping=False`): finished hypotheses are scored
      sum(log p) / generated_length ** length_penalty, and the best one is returned.
    no_repeat_ngram_size: bans tokens that would repeat an n-gram, in the scope that
      `no_repeat_ngram_scope` names: "sequence", of prompt + output (transformers' rule for a
      decoder-only model); "output", of the generated tokens only (fairseq's, and the LoRA
      paper's E2E decoding: a prompt's phrases may be copied once).
    apply_fn: called like `model.apply` (default). When `params` hold LoRA factors
      (`lj.trainable_mask` finds factors) or an adapter bank (`lj.stack`) it is wrapped with
      `lora_jax.apply`.
    adapter_ids: int (B,), with a bank in `params`: prompt b decodes with slot
      adapter_ids[b] (-1: the base alone); each of its beams keeps that slot. Swapping
      adapters into the bank (`lj.put`) does not recompile.
    """
    cfg = model.config
    prompt_BxP = jnp.asarray(prompt_ids, jnp.int32)
    if prompt_BxP.ndim != 2:
        raise ValueError(f"prompt_ids must be (batch, length); got shape {prompt_BxP.shape}")
    B, P = prompt_BxP.shape
    mask_BxP = (
        jnp.ones((B, P), bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    )
    if mask_BxP.shape != (B, P):
        raise ValueError(f"attention_mask shape {mask_BxP.shape} != prompt shape {(B, P)}")
    if P + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds the model's context "
            f"of {cfg.max_position_embeddings} tokens"
        )
    if max_new_tokens < 1 or num_beams < 1:
        raise ValueError("max_new_tokens and num_beams must be >= 1")
    if do_sample and (num_beams > 1 or temperature <= 0 or not 0 < top_p <= 1 or top_k < 0):
        raise ValueError(
            "sampling needs num_beams == 1, temperature > 0, 0 < top_p <= 1, top_k >= 0"
        )
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = -1 if eos is None else eos
    pad = next(
        i for i in (pad_token_id, cfg.pad_token_id, eos if eos >= 0 else None, 0) if i is not None
    )
    if no_repeat_ngram_scope not in NGRAM_SCOPES:
        raise ValueError(
            f"no_repeat_ngram_scope must be one of {NGRAM_SCOPES}; got {no_repeat_ngram_scope!r}"
        )
    settings = _Settings(
        max_new_tokens, do_sample, num_beams, no_repeat_ngram_size, no_repeat_ngram_scope
    )
    knobs = _Knobs(
        *(
            jnp.asarray(x, dtype)
            for x, dtype in [
                (eos, jnp.int32),
                (pad, jnp.int32),
                (temperature, jnp.float32),
                (top_k, jnp.int32),
                (top_p, jnp.float32),
                (length_penalty, jnp.float32),
            ]
        )
    )
    if (adapter_ids is None) == lj.has_bank(params):
        raise ValueError(
            "adapter_ids go with params that hold an adapter bank (lj.stack): give both or neither"
        )
    ids_B = None if adapter_ids is None else jnp.asarray(adapter_ids, jnp.int32)
    if ids_B is not None and ids_B.shape != (B,):
        raise ValueError(f"adapter_ids shape {ids_B.shape} != (batch,) = {(B,)}: one per prompt")
    apply_fn = apply_fn or model.apply
    if has_lora(params) or ids_B is not None:
        apply_fn = _with_lora(apply_fn)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(model, apply_fn, settings, knobs, params, prompt_BxP, mask_BxP, rng, ids_B)


def has_lora(params: Any) -> bool:
    """Whether `params` hold a LoRA adapter (lora_jax's naming scheme decides)."""
    return any(jax.tree.leaves(lj.trainable_mask(params)))


@functools.cache
def _with_lora(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    # Cached so that repeated calls reuse one function object, hence one compiled program.
    return lj.apply(apply_fn)


@functools.partial(jax.jit, static_argnames=("model", "apply_fn", "settings"))
def _generate(
    model, apply_fn, settings: _Settings, knobs: _Knobs, params, prompt_BxP, mask_BxP, rng, ids_B
):
    B, P = prompt_BxP.shape
    K, N = settings.num_beams, settings.max_new_tokens
    prompt_BxP, mask_BxP = _left_align(prompt_BxP, mask_BxP)
    positions_BxP = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)
    # Beams start as K copies of each prompt: rows b*K .. b*K+K-1; beam search reorders
    # rows within a prompt's K only, so each row keeps its prompt's adapter.
    prompt_RxP, mask_RxP, positions_RxP = (
        jnp.repeat(x, K, axis=0) for x in (prompt_BxP, mask_BxP, positions_BxP)
    )
    adapter = {} if ids_B is None else {"adapter_ids": jnp.repeat(ids_B, K)}

    def step(cache, ids_RxL, mask_RxL, positions_RxL):
        logits_RxLxV, variables = apply_fn(
            {"params": params, "cache": cache},
            ids_RxL,
            mask_RxL,
            positions_RxL,
            decode=True,
            mutable=["cache"],
            **adapter,
        )
        return logits_RxLxV[:, -1], variables["cache"]

    cache = init_cache(model, B * K, P + N)
    logits_RxV, cache = step(cache, prompt_RxP, mask_RxP, positions_RxP)
    # History for n-gram bans: prompt padding is -1 (never matches); new slots start as pad.
    seq_RxT = jnp.concatenate(
        [jnp.where(mask_RxP, prompt_RxP, -1), jnp.full((B * K, N), knobs.pad_token_id, jnp.int32)],
        axis=1,
    )

    def step_one(cache, tok_R, pos_R):
        ones = jnp.ones((tok_R.shape[0], 1), bool)
        return step(cache, tok_R[:, None], ones, pos_R[:, None])

    next_pos_R = positions_RxP[:, -1] + 1
    loop = _beam_search if K > 1 else _sample
    seq_RxT = loop(settings, knobs, step_one, P, seq_RxT, cache, logits_RxV, next_pos_R, rng)
    return seq_RxT[:, P:]


def _left_align(prompt_BxP, mask_BxP):
    """Move each row's real tokens to the right end, keeping their order (padding goes left)."""
    order_BxP = jnp.argsort(mask_BxP, axis=1, stable=True)
    return jnp.take_along_axis(prompt_BxP, order_BxP, 1), jnp.take_along_axis(
        mask_BxP, order_BxP, 1
    )


def _ban_repeated_ngrams(scores_RxV, seq_RxT, first, cur, n: int):
    """-inf for every token that would complete an n-gram already in seq[:, first:cur]."""
    R, T = seq_RxT.shape
    starts = T - n + 1
    start_S = jnp.arange(starts)
    match_RxS = ((start_S >= first) & (start_S + n - 1 < cur))[None, :]
    for j in range(n - 1):
        window_RxS = seq_RxT[:, j : j + starts]
        last_Rx1 = jax.lax.dynamic_slice_in_dim(seq_RxT, cur - (n - 1) + j, 1, axis=1)
        match_RxS = match_RxS & (window_RxS == last_Rx1) & (window_RxS >= 0)
    banned_RxS = seq_RxT[:, n - 1 :]
    ban_RxV = (
        jnp.zeros(scores_RxV.shape, bool)
        .at[jnp.arange(R)[:, None], jnp.maximum(banned_RxS, 0)]
        .max(match_RxS & (banned_RxS >= 0))
    )
    return jnp.where(ban_RxV, -jnp.inf, scores_RxV)


def _process(settings: _Settings, scores_RxV, seq_RxT, P, t):
    """The n-gram ban on the scores of output token t (seq[:, P:] is the output so far)."""
    n = settings.no_repeat_ngram_size
    if n == 0:
        return scores_RxV
    first = P if settings.no_repeat_ngram_scope == "output" else 0
    return _ban_repeated_ngrams(scores_RxV, seq_RxT, first, P + t, n)


def _choose(settings: _Settings, knobs: _Knobs, logits_BxV, key):
    """Greedy argmax, or a sample after temperature, then top-k, then top-p (nucleus) filtering
    (top-p over the renormalised top-k distribution, as in transformers)."""
    if not settings.do_sample:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    V = logits_BxV.shape[-1]
    logits_BxV = logits_BxV / knobs.temperature
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    k = jnp.where(knobs.top_k > 0, jnp.minimum(knobs.top_k, V), V)
    in_top_k_V = jnp.arange(V) < k
    probs_BxV = jax.nn.softmax(jnp.where(in_top_k_V, sorted_BxV, -jnp.inf), axis=-1)
    keep_BxV = in_top_k_V & (
        jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < knobs.top_p
    )  # keeps the first
    threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV).astype(jnp.int32)


def _sample(
    settings: _Settings, knobs: _Knobs, step_one, P, seq_BxT, cache, logits_BxV, pos_B, rng
):
    """Greedy / sampling loop; returns the filled seq_BxT."""
    B = seq_BxT.shape[0]

    def cond(state):
        t, *_, done_B, _ = state
        return (t < settings.max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        t, seq_BxT, cache, logits_BxV, pos_B, done_B, rng = state
        rng, key = jax.random.split(rng)
        tok_B = _choose(settings, knobs, _process(settings, logits_BxV, seq_BxT, P, t), key)
        tok_B = jnp.where(done_B, knobs.pad_token_id, tok_B)
        seq_BxT = jax.lax.dynamic_update_slice(seq_BxT, tok_B[:, None], (0, P + t))
        done_B = done_B | (tok_B == knobs.eos_token_id)
        logits_BxV, cache = step_one(cache, tok_B, pos_B)
        return t + 1, seq_BxT, cache, logits_BxV, pos_B + 1, done_B, rng

    state = (0, seq_BxT, cache, logits_BxV, pos_B, jnp.zeros((B,), bool), rng)
    return jax.lax.while_loop(cond, body, state)[1]


def _beam_search(
    settings: _Settings, knobs: _Knobs, step_one, P, seq_RxT, cache, logits_RxV, pos_R, rng
):
    """Beam search over rows R = B*K (transformers' vectorised algorithm, early_stopping=False).

    Each step keeps the 2K best continuations; those ending in EOS (or at the length limit) among
    the top K become finished hypotheses scored sum_logp / length**length_penalty, the best K
    others continue. A batch row closes once no running beam can beat its worst finished one.
    Returns seq (B, T) of the best finished hypothesis of each batch row.
    """
    del rng
    K, N, lp = settings.num_beams, settings.max_new_tokens, knobs.length_penalty
    R, T = seq_RxT.shape
    B = R // K
    V = logits_RxV.shape[-1]
    rank_2K = jnp.arange(2 * K)

    def cond(state):
        t, *_, open_B = state
        return (t < N) & jnp.any(open_B)

    def body(state):
        (
            t,
            seq_RxT,
            cache,
            logits_RxV,
            pos_R,
            running_BxK,
            fin_seq_BxKxT,
            fin_BxK,
            fin_flag_BxK,
            open_B,
        ) = state
        logp_RxV = _process(settings, jax.nn.log_softmax(logits_RxV, axis=-1), seq_RxT, P, t)
        cand_BxKV = (running_BxK[..., None] + logp_RxV.reshape(B, K, V)).reshape(B, K * V)
        top_Bx2K, idx_Bx2K = jax.lax.top_k(cand_BxKV, 2 * K)
        rows_Bx2K = jnp.arange(B)[:, None] * K + idx_Bx2K // V
        tok_Bx2K = (idx_Bx2K % V).astype(jnp.int32)
        cand_seq_Bx2KxT = jax.lax.dynamic_update_slice(
            seq_RxT[rows_Bx2K], tok_Bx2K[..., None], (0, 0, P + t)
        )
        hits_Bx2K = (tok_Bx2K == knobs.eos_token_id) | (t + 1 == N)

        # Running beams for the next step: the best K continuations that did not finish.
        running_BxK, keep_BxK = jax.lax.top_k(jnp.where(hits_Bx2K, _NEG, top_Bx2K), K)
        next_rows_R = jnp.take_along_axis(rows_Bx2K, keep_BxK, 1).reshape(R)
        next_tok_R = jnp.take_along_axis(tok_Bx2K, keep_BxK, 1).reshape(R)
        seq_RxT = jnp.take_along_axis(cand_seq_Bx2KxT, keep_BxK[..., None], 1).reshape(R, T)
        cache = reorder_cache(cache, next_rows_R)

        # Finished hypotheses: merge the new ones (top-K ranked, row still open) and keep the best K.
        new_flag_Bx2K = hits_Bx2K & (rank_2K < K)[None] & open_B[:, None]
        new_fin_Bx2K = jnp.where(new_flag_Bx2K, top_Bx2K / (t + 1.0) ** lp, _NEG)
        merged_Bx3K = jnp.concatenate([fin_BxK, new_fin_Bx2K], axis=1)
        fin_BxK, pick_BxK = jax.lax.top_k(merged_Bx3K, K)
        fin_seq_BxKxT = jnp.take_along_axis(
            jnp.concatenate([fin_seq_BxKxT, cand_seq_Bx2KxT], axis=1), pick_BxK[..., None], 1
        )
        fin_flag_BxK = jnp.take_along_axis(
            jnp.concatenate([fin_flag_BxK, new_flag_Bx2K], 1), pick_BxK, 1
        )

        best_running_B = running_BxK[:, 0] / (t + 1.0) ** lp
        worst_fin_B = jnp.where(jnp.all(fin_flag_BxK, axis=1), fin_BxK.min(axis=1), _NEG)
        open_B = open_B & (best_running_B > worst_fin_B)

        logits_RxV, cache = step_one(cache, next_tok_R, pos_R)
        return (
            t + 1,
            seq_RxT,
            cache,
            logits_RxV,
            pos_R + 1,
            running_BxK,
            fin_seq_BxKxT,
            fin_BxK,
            fin_flag_BxK,
            open_B,
        )

    running_BxK = jnp.full((B, K), _NEG).at[:, 0].set(0.0)
    state = (
        0,
        seq_RxT,
        cache,
        logits_RxV,
        pos_R,
        running_BxK,
        jnp.full((B, K, T), knobs.pad_token_id, jnp.int32),
        jnp.full((B, K), _NEG),
        jnp.zeros((B, K), bool),
        jnp.ones((B,), bool),
    )
    fin_seq_BxKxT = jax.lax.while_loop(cond, body, state)[6]
    return fin_seq_BxKxT[:, 0]
