"""The factored forward: `apply` runs an unmodified Flax Linen model with LoRA.

`apply(model.apply)` intercepts the Linen layers that own adapted weights
(``nn.intercept_methods``) and adds the low-rank path to their output::

  y = x·W + s·(dropout(x)·A)·B

computed as two thin contractions — (…, fan_in)·(fan_in, r), then
(…, r)·(r, fan_out) — so neither ΔW nor W + ΔW is ever formed, and the
frozen W gets no weight gradient. Supported layers: ``nn.Dense``,
``nn.DenseGeneral``, ``nn.Einsum`` and ``nn.Embed`` (lookup and ``attend``,
so a tied LM head sees the same adapted table that `merge` produces), inside
``nn.scan`` and ``nn.remat`` too (the scan slices the factors with the
weights). A trained bias delta is added to the output of its layer.

With an adapter bank (`lj.stack`) beside the weights, the call takes per-example
``adapter_ids`` (int (batch,), -1: the base alone) and example b gets slot ids[b]'s
s·(x_b·A)·B: each row *gathers* its slot's factors (A (…, batch, fan_in, R)) and the two
contractions batch over the rows, so the extra cost stays that of one rank-R adapter
(fan_in·R + R·fan_out per token, plus reading batch·(fan_in + fan_out)·R factor elements),
whatever the number of slots; no per-row ΔW is formed. The alternatives cost more: a
one-hot mix of all n slots multiplies the contractions by n, and ``lax.ragged_dot`` needs
the rows sorted by adapter. Measured (``benchmarks/many_adapters.py``, results/
many_adapters.json; CPU, 576 → 576, rank 8, 16 rows, a bank of 16, k = 1, 4, 16 distinct
slots): at 32 tokens per row one-hot takes 2.0–2.2× and ragged_dot 14–20× the gather's
time (at 128 tokens, in a noisier run: 3.4–6.9× and 33–41×); at 1 token per row (decoding)
ragged_dot takes 1.8–2.0×, and one-hot 0.79–0.88× (1.08–1.24× in the noisier run): a
fraction of a millisecond per layer either way, so one kernel, the gather, serves both.

Any other model — NNX modules (an ``nnx.State`` from ``nnx.split``), Linen layers of the
user's own, plain functions of a parameter tree — runs factored through a rewrite of its
traced jaxpr (`lora_jax._traced`, `lora_jax._rewrite`): each adapted weight that no stock
layer consumed adds s·(x·A)·B at every ``dot_general`` and s·take(A)·B at every lookup it
reaches through reshapes, transposes, casts and slices, inside ``jit``, ``scan``,
``remat``, ``cond`` and ``while`` too. A stock-layer model never reaches the rewrite:
``lj.apply`` first runs it under the interceptor alone, which aborts at the first other
layer owning an adapted weight (and a run that leaves an adapted weight unread by any layer
is redone through the rewrite).

`infer_layout` uses the same interception to read, off a model, how each
weight's axes split into stacked, input and output axes.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax import _bank, _dora, _layout, _traced, _tree
from lora_jax._layout import Layout
from lora_jax._quantize import QuantizedArray

_KERNEL_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def apply(apply_fn: Callable[..., Any], *, dropout: float = 0.0) -> Callable[..., Any]:
    """Returns `apply_fn` (e.g. ``model.apply``) running with the factored LoRA forward.

    The returned function has the same signature; give it the adapted params
    (from `lj.init` or `lj.combine`) where the model expects its params.

    Args:
      apply_fn: a function whose first argument is the parameter tree: ``model.apply``
        of a Flax Linen model (or any function around it), or for NNX e.g.
        ``lambda state, x: nnx.merge(graphdef, state)(x)`` with ``state`` the adapted
        ``nnx.State`` (``apply_fn`` gets it without the LoRA leaves).
      dropout: LoRA dropout rate on the adapter input (``LoraConfig.dropout``).
        It draws from the usual ``'dropout'`` rng stream and is off when the call
        gets no ``'dropout'`` rng (the deterministic/eval call).

    Stock Linen layers (``nn.Dense``, ``DenseGeneral``, ``Einsum``, ``Embed``) are
    intercepted and support everything below. Every other adapted weight goes through
    the jaxpr rewrite, which supports plain LoRA factors and bias deltas only, and raises
    an error naming the weight for an adapter bank, a DoRA magnitude, a quantized
    kernel, ``dropout > 0``, and any use of the weight other than a matmul or a lookup
    through views of it (``jnp.tanh(w)``, ``w * 2``, a reshape mixing its input and
    output axes). A ``custom_jvp``/``custom_vjp`` function the weight enters runs its
    primal, differentiated as written.

    The returned function also takes ``adapter_ids=`` (int (batch,)) when the params hold
    an adapter bank (`lj.stack`): example b runs with slot ``adapter_ids[b]``; -1 (or any
    id outside the bank) runs the base alone. Every layer input's leading axis must be
    the batch. Without ``adapter_ids`` the call is unchanged.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, lora_jax as lj
      >>> model = nn.Dense(3)
      >>> x = jnp.ones((2, 4))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> adapted = lj.init(jax.random.key(1), params, lj.LoraConfig(2, 4, "kernel"))
      >>> y = lj.apply(model.apply)({"params": adapted}, x)  # == model.apply at init (B = 0)
      >>> bool(jnp.allclose(y, model.apply({"params": params}, x)))
      True
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lj.apply: dropout {dropout!r} must be a rate in [0, 1).")

    @functools.wraps(apply_fn)
    def apply_with_lora(*args, adapter_ids=None, **kwargs):
        ids_B = None if adapter_ids is None else _bank.check_ids(adapter_ids)

        def intercepted(consumed: set, strict: bool):
            interceptor = functools.partial(
                _lora_interceptor, dropout=dropout, ids_B=ids_B, consumed=consumed, strict=strict
            )
            return nn.intercept_methods(interceptor)

        if isinstance(args[0], nnx.State):
            if not _traced.pending(args[0], set()):
                return apply_fn(*args, **kwargs)
        else:
            consumed: set = set()
            try:
                with intercepted(consumed, strict=True):
                    out = apply_fn(*args, **kwargs)
                if not _traced.pending(args[0], consumed):
                    return out
            except _LeftToRewrite:
                pass
        consumed = set()
        with intercepted(consumed, strict=False):
            return _traced.call(apply_fn, args, kwargs, consumed, dropout)

    return apply_with_lora


class _LeftToRewrite(Exception):
    """A layer other than the stock ones owns an adapted weight: run `_traced.call`."""


def _module_params(module: nn.Module) -> Mapping:
    if module.scope is None or module.is_initializing():
        return {}
    return module.variables.get("params", {})


def _lora_interceptor(
    next_fun, args, kwargs, context, *, dropout: float, ids_B, consumed: set, strict: bool
):
    """Adds the adapters of a stock layer's weights to its output and records their paths
    (and its bias's, with a delta) in `consumed`. Another module's adapted weights are left
    to the rewrite (`lora_jax._traced`); with `strict`, meeting one raises `_LeftToRewrite`."""
    module, method = context.module, context.method_name
    if method not in ("__call__", "attend"):
        return next_fun(*args, **kwargs)
    own = {k: v for k, v in _module_params(module).items() if not isinstance(v, Mapping)}
    quantized = [k for k, v in own.items() if isinstance(v, QuantizedArray)]
    own = {k: v.dequantize() if k in quantized else v for k, v in own.items()}
    adapted = [k[: -len(_tree.A_SUFFIX)] for k in own if str(k).endswith(_tree.A_SUFFIX)]
    if adapted and not isinstance(module, (*_KERNEL_LAYERS, nn.Embed)):
        if strict:
            raise _LeftToRewrite
        adapted = []
    banked = [k[: -len(_bank.BANK_A)] for k in own if str(k).endswith(_bank.BANK_A)]
    scope = tuple(module.scope.path) if own else ()
    consumed.update(scope + (weight,) for weight in adapted + banked)
    has_delta = "bias" + _tree.DELTA_SUFFIX in own
    if not adapted and not banked and not has_delta and not quantized:
        return next_fun(*args, **kwargs)

    y = _dequantized_call(module, args, kwargs, own) if quantized else next_fun(*args, **kwargs)
    where = "/".join(module.scope.path)
    if banked and ids_B is None:
        raise ValueError(
            f"lj.apply: {where}/{banked[0]} has an adapter bank; call with adapter_ids=ids "
            "(int (batch,), one slot per example, -1 for the base)."
        )
    if adapted or banked:
        x = args[0]
        if isinstance(module, _KERNEL_LAYERS) and method == "__call__":
            x = _dropout(module, x, dropout)
        for weight in adapted:
            factors = [own[weight + s] for s in _SINGLE]
            term = _adapter_term(module, method, args, kwargs, x, own[weight], factors, y, where)
            magnitude = own.get(weight + _tree.MAGNITUDE_SUFFIX)
            if magnitude is not None:
                term = _dora_term(module, args, kwargs, x, own, weight, factors, term, y)
            y = y + term
        for weight in banked:
            factors = [own[weight + s] for s in _bank.BANK_SUFFIXES[:3]]
            y = y + _bank_term(module, method, args, kwargs, x, own[weight], factors, y, ids_B)
    if has_delta and method == "__call__":
        y = y + _bias_delta(module, args, kwargs, own, y)
        consumed.add(scope + ("bias",))
    return y


_SINGLE = (_tree.A_SUFFIX, _tree.B_SUFFIX, _tree.SCALE_SUFFIX)


def _adapter_term(module, method, args, kwargs, x, w, factors, y, where, per_row=False):
    """The low-rank term added to the layer's output `y` for input `x` (dropped out).

    `factors` are A, B, s, or `per_row`, each row's own, gathered (see `_bank_term`).
    """
    where = f"{where}/{'embedding' if isinstance(module, nn.Embed) else 'kernel'}"
    if isinstance(module, nn.Embed):
        _check_embed(where, w.shape, *(f.shape for f in factors))
        return _embed_term(method, x, *factors, y.dtype)
    if isinstance(module, _KERNEL_LAYERS) and method == "__call__":
        x_sub, k_sub, y_sub = _einsum_spec(module, args, kwargs)
        lay = _check_layout(module, w.shape, [f.shape for f in factors], where, per_row)
        row = x_sub[0] if per_row else ""
        if row and (row in k_sub or row not in y_sub):
            raise ValueError(
                f"lj.apply: {where} contracts or stacks its input's leading axis, so "
                "adapter_ids cannot pick an adapter per example there; give the layer a "
                "leading batch axis."
            )
        return _factored_term(x_sub, k_sub, y_sub, x, lay, *factors, y.dtype, row)
    raise TypeError(
        f"lj.apply: {where} is adapted, but {type(module).__name__} is not a layer "
        "lj.apply knows how to adapt (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Embed). "
        "Use lj.materialize(params) with the unmodified model instead."
    )


def _bank_term(module, method, args, kwargs, x, w, factors, y, ids_B):
    """Σ over rows b of slot ids_B[b]'s term: each row gathers its slot's factors."""
    where = "/".join(module.scope.path)
    a, b, s = factors
    n_stack = s.ndim - 1
    rows = x.shape[0] if x.ndim else None
    if rows != ids_B.shape[0]:
        raise ValueError(
            f"lj.apply: {where} gets an input of shape {x.shape} for {ids_B.shape[0]} "
            "adapter_ids; give one id per example (the inputs' leading axis)."
        )
    if isinstance(module, nn.Embed):
        _check_embed(f"{where}/embedding", w.shape, a.shape[1:], b.shape[1:], s.shape[1:])
        return _embed_bank_term(method, x, a, b, s, ids_B, y.dtype)
    gathered = [_bank.gather(f, ids_B, n_stack) for f in factors]
    return _adapter_term(module, method, args, kwargs, x, w, gathered, y, where, per_row=True)


def _embed_bank_term(method, x, a_NxVxR, b_NxRxD, s_N, ids_B, dtype):
    """`_embed_term` with each row's slot: token ids x (B, …) → row x of slot ids_B[b]'s A
    (one element gather per token, not a copy of A per row), then that slot's B."""
    a_NxVxR, b_NxRxD, s_N = a_NxVxR.astype(dtype), b_NxRxD.astype(dtype), s_N.astype(dtype)
    n, vocab, rank = a_NxVxR.shape
    b_BxRxD, s_B = _bank.gather(b_NxRxD, ids_B, 0), _bank.gather(s_N, ids_B, 0)
    if method == "__call__":
        rest = string.ascii_uppercase[: x.ndim - 1]  # the token axes after the rows (Z)
        slot_Bx1 = ids_B.reshape((-1,) + (1,) * (x.ndim - 1))
        flat_index = jnp.where((slot_Bx1 >= 0) & (slot_Bx1 < n), slot_Bx1 * vocab + x, -1)
        a_Bx_xR = _bank.gather(a_NxVxR.reshape(n * vocab, rank), flat_index, 0)
        return jnp.einsum(f"Z{rest}r,Zrd,Z->Z{rest}d", a_Bx_xR, b_BxRxD, s_B)
    rest = string.ascii_uppercase[: x.ndim - 2]  # attend: x is (rows Z, …, features d)
    a_BxVxR = _bank.gather(a_NxVxR, ids_B, 0)
    q_b = jnp.einsum(f"Z{rest}d,Zrd,Z->Z{rest}r", x.astype(dtype), b_BxRxD, s_B)
    return jnp.einsum(f"Z{rest}r,Zvr->Z{rest}v", q_b, a_BxVxR)


def _dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    if rate == 0.0 or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _check_embed(where, table_shape, a_shape, b_shape, s_shape) -> None:
    _layout.check_fits(where, table_shape, a_shape, b_shape, s_shape)
    if len(table_shape) != 2:
        raise ValueError(
            f"lj.apply: {where} has stacked factors {a_shape}; an "
            "nn.Embed table adapts as (vocab, features)."
        )


def _embed_term(method, x, a, b, s, dtype):
    a, b, s = a.astype(dtype), b.astype(dtype), s.astype(dtype)
    if method == "__call__":  # rows of A for the ids, then B
        return (jnp.take(a, x, axis=0) * s) @ b
    return ((x.astype(dtype) @ b.T) * s) @ a.T  # attend: q·(E + sAB)ᵀ = q·Eᵀ + s·(q·Bᵀ)·Aᵀ


def _einsum_spec(module, args, kwargs) -> tuple[str, str, str]:
    """(input, kernel, output) subscripts of the layer's own contraction."""
    x = args[0]
    letters = iter(string.ascii_letters)
    if isinstance(module, nn.Einsum):
        equation = _equation(module, args, kwargs)
        inputs, y_sub = equation.split("->")
        x_sub, k_sub = inputs.split(",")
        if "..." in x_sub:
            used = set(equation)
            free = [c for c in string.ascii_letters if c not in used]
            fill = "".join(free[: x.ndim - (len(x_sub) - 3)])
            x_sub, y_sub = x_sub.replace("...", fill), y_sub.replace("...", fill)
        return x_sub, k_sub, y_sub
    x_sub = "".join(next(letters) for _ in range(x.ndim))
    if isinstance(module, nn.DenseGeneral):
        axis = _normalize(module.axis, x.ndim)
        batch = _normalize(module.batch_dims, x.ndim)
        features = "".join(next(letters) for _ in _as_tuple(module.features))
        k_sub = "".join(x_sub[i] for i in batch) + "".join(x_sub[i] for i in axis) + features
        free = "".join(c for i, c in enumerate(x_sub) if i not in axis and i not in batch)
        return x_sub, k_sub, "".join(x_sub[i] for i in batch) + free + features
    out = next(letters)  # nn.Dense
    return x_sub, x_sub[-1] + out, x_sub[:-1] + out


def _equation(module: nn.Einsum, args, kwargs) -> str:
    equation = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None)
    return (equation or module.einsum_str).replace(" ", "")


def _as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _normalize(axes, ndim) -> tuple[int, ...]:
    return tuple(a % ndim for a in _as_tuple(axes))


def _check_layout(module, w_shape, shapes, where, per_row=False) -> Layout:
    """The layout of the factors of `shapes` (A, B, s; `per_row`, with a row axis after the
    stacked ones); a DenseGeneral must agree with it."""
    if per_row:
        n_stack = len(shapes[2]) - 1
        shapes = [shape[:n_stack] + shape[n_stack + 1 :] for shape in shapes]
    lay = _layout.check_fits(where, w_shape, *shapes)
    if isinstance(module, nn.DenseGeneral):
        expected = (len(_as_tuple(module.batch_dims)), len(_as_tuple(module.axis)))
        if lay != expected:
            raise ValueError(
                f"lj.apply: the factors of {where} {tuple(w_shape)} were made with layout "
                f"(stack={lay.stack}, fan_in={lay.fan_in}), but this nn.DenseGeneral contracts "
                f"{expected[1]} input axes over {expected[0]} batch axes. Create them with "
                "lj.init(key, params, config, layout=lj.infer_layout(model.apply, variables, *args))."
            )
    return lay


def _factored_term(x_sub, k_sub, y_sub, x, lay, a, b, s, dtype, row=""):
    """s·(x·A)·B for a layer computing einsum(x_sub,k_sub->y_sub)(x, W).

    `lay` splits the kernel's subscripts `k_sub` into stacked, input and output axes. With
    a `row` letter (an axis of x and y), A, B and s carry that axis after the stacked ones:
    each row's own factors.
    """
    rank = next(c for c in string.ascii_letters if c not in x_sub + k_sub + y_sub)
    stack, ins, outs = _layout.split(k_sub, lay)
    a_sub, b_sub, s_sub = stack + row + ins + rank, stack + row + rank + outs, stack + row
    # Keep every index that B or the output still needs; contract the rest.
    t_sub = "".join(dict.fromkeys(c for c in x_sub + a_sub if c in b_sub + y_sub))
    xa = jnp.einsum(
        f"{x_sub},{a_sub},{s_sub}->{t_sub}", x.astype(dtype), a.astype(dtype), s.astype(dtype)
    )
    return jnp.einsum(f"{t_sub},{b_sub}->{y_sub}", xa, b.astype(dtype))


def _dequantized_call(module, args, kwargs, own):
    """The layer's output with its quantized kernel dequantised here (`lj.quantize`):
    einsum(x, W) plus the bias, in the layer's dtype."""
    if not isinstance(module, _KERNEL_LAYERS) or "kernel" not in own:
        raise TypeError(
            f"lj.apply: {'/'.join(module.scope.path)} holds a quantized weight, but only "
            "the kernels of nn.Dense, DenseGeneral and Einsum run quantized; leave it out "
            "of lj.quantize's targets."
        )
    x = args[0]
    x_sub, k_sub, y_sub = _einsum_spec(module, args, kwargs)
    dtype = module.dtype or jnp.result_type(x, own["kernel"])
    y = jnp.einsum(f"{x_sub},{k_sub}->{y_sub}", x.astype(dtype), own["kernel"].astype(dtype))
    if own.get("bias") is not None:
        y = y + _bias_like_output(module, args, kwargs, own["bias"], y)
    return y


def _dora_term(module, args, kwargs, x, own, weight, factors, lora_term, y):
    """What DoRA adds to the layer's output `y` (PEFT's ``DoraLinearLayer.forward``):
    (g − 1)·(x·W) + g·s·(x·A)·B with g = m / ‖W + s·A·B‖_col, broadcast over the output's
    feature axes; x·W is `y` less its bias, or x·W again when dropout changed x (as PEFT).
    """
    if not isinstance(module, _KERNEL_LAYERS):
        raise TypeError(
            f"lj.apply: {'/'.join(module.scope.path)} has a DoRA magnitude, but DoRA adapts "
            "kernels of nn.Dense, DenseGeneral and Einsum only."
        )
    w = own[weight]
    x_sub, k_sub, y_sub = _einsum_spec(module, args, kwargs)
    lay = _layout.check_fits(weight, w.shape, *(f.shape for f in factors))
    magnitude = own[weight + _tree.MAGNITUDE_SUFFIX]
    g = _dora.magnitude_scale(magnitude, w, *factors, lay).astype(y.dtype)
    stack, _, outs = _layout.split(k_sub, lay)
    if x is args[0]:
        bias = own.get("bias")
        base = y if bias is None else y - _bias_like_output(module, args, kwargs, bias, y)
    else:
        base = jnp.einsum(f"{x_sub},{k_sub}->{y_sub}", x.astype(y.dtype), w.astype(y.dtype))
    per_feature = f"{y_sub},{stack}{outs}->{y_sub}"
    return jnp.einsum(per_feature, base, g - 1) + jnp.einsum(per_feature, lora_term, g)


def _bias_delta(module, args, kwargs, own, y):
    """The bias delta shaped to broadcast over the layer's output, as its bias is."""
    return _bias_like_output(module, args, kwargs, own["bias" + _tree.DELTA_SUFFIX], y)


def _bias_like_output(module, args, kwargs, bias, y):
    """A bias-shaped array shaped to broadcast over the layer's output, as its bias is."""
    delta = bias.astype(y.dtype)
    if isinstance(module, nn.Einsum):
        _, broadcast_shape = module._get_bias_shape(
            _equation(module, args, kwargs), args[0], _module_params(module)["kernel"]
        )
        return delta.reshape(broadcast_shape)
    if isinstance(module, nn.DenseGeneral) and _as_tuple(module.batch_dims):
        x_sub, _, y_sub = _einsum_spec(module, args, kwargs)
        batch = {x_sub[i] for i in _normalize(module.batch_dims, args[0].ndim)}
        n_features = len(_as_tuple(module.features))
        return delta.reshape(
            [
                y.shape[i] if (c in batch or i >= y.ndim - n_features) else 1
                for i, c in enumerate(y_sub)
            ]
        )
    return delta  # bias on the trailing axes of the output (Dense, norms, convs)


def infer_layout(
    apply_fn: Callable[..., Any], variables: Any, *args, **kwargs
) -> dict[str, Layout]:
    """Reads each weight's `Layout` off a model by tracing ``apply_fn`` once.

    Args:
      apply_fn: ``model.apply`` (or a function calling the model).
      variables: what ``apply_fn`` takes first, usually ``{"params": params}``.
      *args, **kwargs: the rest of a valid call (shapes are all that matter;
        nothing is computed).

    Returns:
      ``{path: Layout(stack, fan_in)}`` for every ``nn.Dense``, ``nn.DenseGeneral``,
      ``nn.Einsum`` kernel and ``nn.Embed`` table the call uses, with paths as in
      ``variables["params"]``; pass it as ``lj.init(..., layout=...)``.
    """
    params = variables.get("params", variables) if isinstance(variables, Mapping) else variables
    shapes = {k: _tree.value(v).shape for k, v in _tree.flatten(params).items()}
    found: dict[str, Layout] = {}

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (*_KERNEL_LAYERS, nn.Embed)):
            name = "embedding" if isinstance(module, nn.Embed) else "kernel"
            path = tuple(module.scope.path) + (name,)
            if path in shapes:
                lay = _layout_of(
                    module,
                    call_args,
                    call_kwargs,
                    len(shapes[path]) - module.get_variable("params", name).ndim,
                )
                if lay is not None:
                    found[_tree.path_str(path)] = lay
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(functools.partial(apply_fn, **kwargs), variables, *args)
    return found


def _layout_of(module, args, kwargs, scanned: int) -> Layout | None:
    if isinstance(module, (nn.Embed, nn.Dense)):
        return Layout(scanned, 1)
    if isinstance(module, nn.DenseGeneral):
        return Layout(scanned + len(_as_tuple(module.batch_dims)), len(_as_tuple(module.axis)))
    x_sub, k_sub, y_sub = _einsum_spec(module, args, kwargs)
    batch = [c for c in k_sub if c in x_sub and c in y_sub]
    ins = [c for c in k_sub if c in x_sub and c not in y_sub]
    if k_sub != "".join(batch + ins) + k_sub[len(batch) + len(ins) :] or not ins:
        return None  # kernel axes not ordered (batch, in, out): the default layout applies
    return Layout(scanned + len(batch), len(ins))
