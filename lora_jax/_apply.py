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

from lora_jax import _layout, _tree
from lora_jax._layout import Layout

_KERNEL_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def apply(apply_fn: Callable[..., Any], *, dropout: float = 0.0) -> Callable[..., Any]:
    """Returns `apply_fn` (e.g. ``model.apply``) running with the factored LoRA forward.

    The returned function has the same signature; give it the adapted params
    (from `lj.init` or `lj.combine`) where the model expects its params.

    Args:
      apply_fn: a function that calls a Flax Linen model (``model.apply`` or any
        function around it).
      dropout: LoRA dropout rate on the adapter input (``LoraConfig.dropout``).
        It draws from the usual ``'dropout'`` rng stream and is off when the call
        gets no ``'dropout'`` rng (the deterministic/eval call).

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
    interceptor = functools.partial(_lora_interceptor, dropout=dropout)

    @functools.wraps(apply_fn)
    def apply_with_lora(*args, **kwargs):
        with nn.intercept_methods(interceptor):
            return apply_fn(*args, **kwargs)

    return apply_with_lora


def _module_params(module: nn.Module) -> Mapping:
    if module.scope is None or module.is_initializing():
        return {}
    return module.variables.get("params", {})


def _lora_interceptor(next_fun, args, kwargs, context, *, dropout: float):
    module, method = context.module, context.method_name
    if method not in ("__call__", "attend"):
        return next_fun(*args, **kwargs)
    own = {k: v for k, v in _module_params(module).items() if not isinstance(v, Mapping)}
    adapted = [k[: -len(_tree.A_SUFFIX)] for k in own if str(k).endswith(_tree.A_SUFFIX)]
    has_delta = "bias" + _tree.DELTA_SUFFIX in own
    if not adapted and not has_delta:
        return next_fun(*args, **kwargs)

    y = next_fun(*args, **kwargs)
    where = "/".join(module.scope.path)
    if adapted:
        weight = adapted[0]
        factors = [own[weight + s] for s in (_tree.A_SUFFIX, _tree.B_SUFFIX, _tree.SCALE_SUFFIX)]
        if isinstance(module, nn.Embed):
            y = y + _embed_term(method, args[0], own[weight], *factors, y.dtype, where)
        elif isinstance(module, _KERNEL_LAYERS) and method == "__call__":
            x = _dropout(module, args[0], dropout)
            x_sub, k_sub, y_sub = _einsum_spec(module, args, kwargs)
            lay = _check_layout(module, own[weight].shape, factors, where)
            y = y + _factored_term(x_sub, k_sub, y_sub, x, lay, *factors, y.dtype)
        else:
            raise TypeError(
                f"lj.apply: {where}/{weight} is adapted, but {type(module).__name__} is not a layer "
                "lj.apply knows how to adapt (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Embed). "
                "Use lj.materialize(params) with the unmodified model instead."
            )
    if has_delta and method == "__call__":
        y = y + _bias_delta(module, args, kwargs, own, y)
    return y


def _dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    if rate == 0.0 or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _embed_term(method, x, table, a, b, s, dtype, where):
    _layout.check_fits(f"{where}/embedding", table.shape, a.shape, b.shape, s.shape)
    if table.ndim != 2:
        raise ValueError(
            f"lj.apply: {where}/embedding has stacked factors {a.shape}; an "
            "nn.Embed table adapts as (vocab, features)."
        )
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


def _check_layout(module, w_shape, factors, where) -> Layout:
    """The layout of the factors; a DenseGeneral must agree with it."""
    a, b, s = factors
    lay = _layout.check_fits(f"{where}/kernel", w_shape, a.shape, b.shape, s.shape)
    if isinstance(module, nn.DenseGeneral):
        expected = (len(_as_tuple(module.batch_dims)), len(_as_tuple(module.axis)))
        if lay != expected:
            raise ValueError(
                f"lj.apply: the factors of {where}/kernel {tuple(w_shape)} were made with layout "
                f"(stack={lay.stack}, fan_in={lay.fan_in}), but this nn.DenseGeneral contracts "
                f"{expected[1]} input axes over {expected[0]} batch axes. Create them with "
                "lj.init(key, params, config, layout=lj.infer_layout(model.apply, variables, *args))."
            )
    return lay


def _factored_term(x_sub, k_sub, y_sub, x, lay, a, b, s, dtype):
    """s·(x·A)·B for a layer computing einsum(x_sub,k_sub->y_sub)(x, W).

    `lay` splits the kernel's subscripts `k_sub` into stacked, input and output axes.
    """
    rank = next(c for c in string.ascii_letters if c not in x_sub + k_sub + y_sub)
    stack, ins, outs = _layout.split(k_sub, lay)
    a_sub, b_sub = stack + ins + rank, stack + rank + outs
    # Keep every index that B or the output still needs; contract the rest.
    t_sub = "".join(dict.fromkeys(c for c in x_sub + a_sub if c in b_sub + y_sub))
    xa = jnp.einsum(
        f"{x_sub},{a_sub},{stack}->{t_sub}", x.astype(dtype), a.astype(dtype), s.astype(dtype)
    )
    return jnp.einsum(f"{t_sub},{b_sub}->{y_sub}", xa, b.astype(dtype))


def _bias_delta(module, args, kwargs, own, y):
    """The bias delta shaped to broadcast over the layer's output, as its bias is."""
    delta = own["bias" + _tree.DELTA_SUFFIX].astype(y.dtype)
    if isinstance(module, nn.Einsum):
        _, broadcast_shape = module._get_bias_shape(
            _equation(module, args, kwargs), args[0], own["kernel"]
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
