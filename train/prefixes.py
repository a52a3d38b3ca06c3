"""Prefix tuning, the LoRA paper's PreEmbed and PreLayer baselines (Li & Liang 2021), as a
method of the pipeline: a tree transform (:func:`init`) and an apply wrapper
(:func:`apply`) around the unmodified ``models.Decoder``.

P = ``prefix.length`` trainable positions stand before every row's tokens. Designs
(``method``):

* ``pre_embed``: the model's input at those positions, their embeddings (P, D), is
  trainable: ``embed_tokens/prefix``. |Θ| = P·D.
* ``pre_layer``: every block's input at those positions is trainable, so the activations
  the previous block computed there are replaced by trainable ones (the LoRA paper's
  definition): ``layers_<i>/prefix`` (P, D), or ``layers/prefix`` (N, P, D) when the layers
  are scanned. Each block's keys and values at the prefix are its projections of them: a
  key/value prefix per layer. |Θ| = N·P·D.

(The paper's counts with no infix, l_i = 0: d_model·l_p and L·d_model·l_p.)
:func:`parameter_count` gives them. Both start as the base prompted with P tokens drawn from the
vocabulary (Li & Liang: real words' activations train stably where random vectors do
not): their embeddings, or the base's activations for them at every block's input. (The
embeddings at every block instead started SmolLM2-135M-Instruct at a validation loss of
11.9 nats/token on E2E; its activations start it at 2.45, the base prompted with 10
random tokens.)

:func:`apply` puts P placeholder tokens (id 0, replaced by the interceptor) before each
call's tokens: valid, in segment 1 (with ``segment_ids``: a packed row's later examples
would not see the prefix, so the config refuses packing), at positions 0..P-1, the
tokens' positions moved up by P; their logits are dropped. Decoding with a KV cache
(``models.generate(apply_fn=apply(...))``): the first call on a cache adds P slots in
front of it for the prefix and marks the cache (:data:`CACHE_MARK`), so later calls add
none. A prefix is extra context, not a change of W: it cannot be merged.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import lora_jax as lj
import models
from models.decoder import DecoderLayer

NAME = "prefix"  # the trainable leaf
DESIGNS = ("pre_embed", "pre_layer")
EMBED_PATH = f"embed_tokens/{NAME}"
LAYER_PATH = re.compile(rf"^(layers_\d+|layers)/{NAME}$")
CACHE_MARK = "prefix_slots"  # a scalar in a cache that holds the prefix: P


def _check_design(design: str) -> None:
    if design not in DESIGNS:
        raise ValueError(f"unknown prefix design {design!r}; use one of {list(DESIGNS)}")


def parameter_count(design: str, hidden_size: int, num_layers: int, length: int) -> int:
    """Closed form of the parameters ``design`` trains: P·D (pre_embed), N·P·D (pre_layer)."""
    _check_design(design)
    return length * hidden_size * (num_layers if design == "pre_layer" else 1)


def prefix_ids(key: jax.Array, vocab_size: int, length: int) -> jax.Array:
    """The P token ids (int32 (P,), uniform over the vocabulary) a prefix starts from."""
    return jax.random.randint(key, (length,), 0, vocab_size)


def layer_inputs(model: models.Decoder, params: Any, ids_1xP: jax.Array) -> jax.Array:
    """Each block's input when ``model`` with ``params`` reads ``ids_1xP`` alone: float32
    (N, P, D). Read from the same model unrolled and without remat (one trace, so an
    interceptor can record them); scanned params are cut into their layers for it."""
    config = dataclasses.replace(model.config, scan_layers=False, remat_policy="none")
    flat = lj.flatten_paths(params)
    if model.config.scan_layers:  # layers/... (N, ...) -> layers_<i>/...
        flat = {
            path.replace("layers/", f"layers_{i}/"): x[i] if path.startswith("layers/") else x
            for i in range(config.num_layers)
            for path, x in flat.items()
        }
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, DecoderLayer) and context.method_name == "__call__":
            seen[context.module.name] = args[0][0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        models.Decoder(config).apply({"params": lj.unflatten_paths(flat)}, ids_1xP)
    return jnp.stack([seen[f"layers_{i}"] for i in range(config.num_layers)]).astype(jnp.float32)


def init(
    key: jax.Array, params: Any, design: str, length: int, model: models.Decoder | None = None
) -> Any:
    """``params`` (of ``model``, a ``models.Decoder``) with the prefix of ``design``, P =
    ``length`` positions, added so that the adapted model starts as the base prompted with
    the P tokens :func:`prefix_ids` draws from ``key`` (Li & Liang's initialisation with
    real words): their embedding rows as ``embed_tokens/prefix`` (P, D), or the base's
    activations for them at each block's input (:func:`layer_inputs`, which needs
    ``model``) as every layer's ``prefix`` (P, D; (N, P, D) under ``layers/`` when
    scanned); float32. The base leaves are kept."""
    _check_design(design)
    if length < 1:
        raise ValueError(f"the prefix length must be >= 1; got {length}")
    flat = lj.flatten_paths(params)
    table_VxD = flat.get("embed_tokens/embedding")
    if table_VxD is None:
        raise ValueError(f"{design}: the params have no embed_tokens/embedding (a Decoder's)")
    ids_P = prefix_ids(key, table_VxD.shape[0], length)
    if design == "pre_embed":
        return lj.unflatten_paths(
            flat | {EMBED_PATH: jnp.asarray(table_VxD)[ids_P].astype(jnp.float32)}
        )
    if model is None:
        raise ValueError("pre_layer starts from the base's activations: pass the model")
    inputs_NxPxD = layer_inputs(model, params, ids_P[None])
    if model.config.scan_layers:  # one stacked leaf, the layer axis first
        return lj.unflatten_paths(flat | {f"layers/{NAME}": inputs_NxPxD})
    added = {f"layers_{i}/{NAME}": x_PxD for i, x_PxD in enumerate(inputs_NxPxD)}
    return lj.unflatten_paths(flat | added)


def trainable_mask(params: Any) -> Any:
    """True on the prefix leaves (``embed_tokens/prefix``, ``layers*/prefix``)."""
    flat = lj.flatten_paths(params)
    return lj.unflatten_paths(
        {p: p == EMBED_PATH or bool(LAYER_PATH.match(p)) for p in flat}, like=params
    )


def prefix_length(params: Any) -> int:
    """P, read from the prefix leaves' shapes (static)."""
    for path, leaf in lj.flatten_paths(params).items():
        if path == EMBED_PATH or LAYER_PATH.match(path):
            return leaf.shape[-2]
    raise ValueError(
        f"the params have no prefix ({EMBED_PATH} or layers_<i>/{NAME}); build them with "
        "train.prefixes.init(key, params, design, length, model)"
    )


def _substitute(x_BxLxD: jax.Array, prefix_PxD: jax.Array) -> jax.Array:
    P = prefix_PxD.shape[0]
    return x_BxLxD.at[:, :P].set(prefix_PxD.astype(x_BxLxD.dtype)[None])


def _interceptor(design: str) -> Callable[..., Any]:
    """Puts the prefix into the first P rows: of the token embeddings (pre_embed), or of
    every block's input (pre_layer)."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if design == "pre_embed" and isinstance(module, nn.Embed) and module.name == "embed_tokens":
            return _substitute(next_fun(*args, **kwargs), module.variables["params"][NAME])
        if design == "pre_layer" and isinstance(module, DecoderLayer):
            x_BxLxD = _substitute(args[0], module.variables["params"][NAME])
            return next_fun(x_BxLxD, *args[1:], **kwargs)
        return next_fun(*args, **kwargs)

    return intercept


def _prepend(x_BxL: Any, P: int, value: Any) -> jax.Array | None:
    if x_BxL is None:
        return None
    x_BxL = jnp.asarray(x_BxL)
    return jnp.concatenate([jnp.full((x_BxL.shape[0], P), value, x_BxL.dtype), x_BxL], axis=1)


def _with_prefix_slots(cache: Any, P: int) -> Any:
    """An empty cache with P more slots in front (valid: the prefix's)."""

    def grow(path, x):
        name = path[-1].key
        if name == "index":
            return x
        if name == "valid":  # (B, S)
            return _prepend(x, P, True)
        pad = [(0, 0)] * x.ndim  # key / value: (..., B, S, K, H)
        pad[-3] = (P, 0)
        return jnp.pad(x, pad)

    return jax.tree_util.tree_map_with_path(grow, cache)


def _marked(out: tuple[jax.Array, Any], P: int) -> tuple[jax.Array, Any]:
    """``(logits, variables)`` with the cache in ``variables`` marked as holding the prefix."""
    logits, variables = out
    return logits, {**variables, "cache": {**variables["cache"], CACHE_MARK: jnp.int32(P)}}


@functools.cache  # one function object per (fn, design): models.generate jits on it
def apply(fn: Callable[..., Any], design: str) -> Callable[..., Any]:
    """``fn`` (``model.apply`` of a ``models.Decoder``) with the prefix of ``design`` read
    from the params (:func:`init`) before every row (module docstring); same signature."""
    _check_design(design)
    intercept = _interceptor(design)

    @functools.wraps(fn)
    def with_prefix(
        variables,
        token_ids,
        attention_mask=None,
        positions=None,
        decode: bool = False,
        segment_ids=None,
        **kwargs,
    ):
        P = prefix_length(variables["params"])
        if positions is not None:  # the tokens' positions, after the prefix's
            positions = jnp.asarray(positions, jnp.int32) + P
        cache = variables.get("cache")
        cached = decode and cache is not None
        if cached and CACHE_MARK in cache:  # a later call: the prefix is in the cache
            variables = {**variables, "cache": {k: v for k, v in cache.items() if k != CACHE_MARK}}
            out = fn(variables, token_ids, attention_mask, positions, decode, segment_ids, **kwargs)
            return _marked(out, P)
        if cached:
            variables = {**variables, "cache": _with_prefix_slots(cache, P)}
        token_ids = _prepend(token_ids, P, 0)
        attention_mask = _prepend(attention_mask, P, 1)
        segment_ids = _prepend(segment_ids, P, 1)
        if positions is not None:
            prefix_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (positions.shape[0], P))
            positions = jnp.concatenate([prefix_BxP, positions], axis=1)
        with nn.intercept_methods(intercept):
            out = fn(variables, token_ids, attention_mask, positions, decode, segment_ids, **kwargs)
        if isinstance(out, tuple):  # (logits, mutated variables)
            logits, updated = out
            return _marked((logits[:, P:], updated), P) if cached else (logits[:, P:], updated)
        return out[:, P:]

    return with_prefix
