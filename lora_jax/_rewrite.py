"""The factored forward for any traced function: a rewrite of its jaxpr.

`lj.apply` hands here the adapted weights no stock Linen layer consumed (NNX modules,
custom Linen layers, plain functions of a parameter tree): `lora_jax._traced` traces the
function once (``jax.make_jaxpr``) and `evaluate` runs the jaxpr again, equation by
equation, with each such
weight W carried as a `Tracked` value: the array W' that the traced code made of W through
*views* (reshape, transpose, dtype casts, size-1 axes, broadcasting to new leading axes,
slices) together with the same views of A, B and s. Each axis of W' comes from W's
stacked, input or output axes, and A holds the first two kinds, B the last two, s the
stacked ones, so a view of W is a view of each factor. Where W' meets

* ``dot_general`` (either operand, any contraction and batch axes, as the primitive's
  ``dimension_numbers`` say): x·W' + s·((x·A')·B'), contracting x with A' first when
  input axes are contracted, with B' first otherwise (a tied head ``x·Eᵀ``);
* ``gather`` along one axis (``jnp.take``, an embedding lookup): an input or output axis
  gives take(W') + s·take(A')·B' (the size of the lookup's output); a stacked axis (a
  layer index) gives a smaller `Tracked` value.

Nothing of size fan_in × fan_out is formed. Anything else that reads W' (an elementwise
op, a reduction, a reshape mixing input and output axes, W' in a loop carry) raises a
ValueError naming the weight and the primitive. Equations that read no `Tracked` value are
bound unchanged; nested jaxprs that do are inlined (``jit``, ``closed_call``, and
``custom_jvp_call`` / ``custom_vjp_call``, whose primal is then differentiated as written:
their custom rule is dropped, which is sound as long as the primal is differentiable) or
re-expressed with public JAX (``remat`` → ``jax.checkpoint`` with the same policy,
``scan`` → ``lax.scan`` with W' sliced as its factors, ``cond`` → ``lax.switch``,
``while`` → ``lax.while_loop`` with W' a loop constant). Only public JAX APIs are used.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from jax import lax

from lora_jax import _layout

_STACKED, _INPUT, _OUTPUT = "stacked", "input", "output"


@jax.tree_util.register_pytree_node_class
class Tracked:
    """A view W' of an adapted weight W with the same views of its factors.

    ``a`` is (*a_axes, r), ``b`` is (*b_axes, r) and ``s`` is (*s_axes): entry j of
    ``a_axes`` is the axis of ``w`` that A's axis j follows. W' + s'·A'·B' is the view of
    W + s·A·B. Axes in ``s_axes`` are stacked (in all three); the others are in A only
    (input) or in B only (output). ``name`` is W's path, for errors.
    """

    def __init__(self, name, w, a, b, s, a_axes, b_axes, s_axes):
        self.name, self.w, self.a, self.b, self.s = name, w, a, b, s
        self.a_axes, self.b_axes, self.s_axes = tuple(a_axes), tuple(b_axes), tuple(s_axes)

    def tree_flatten(self):
        return (self.w, self.a, self.b, self.s), (self.name, self.a_axes, self.b_axes, self.s_axes)

    @classmethod
    def tree_unflatten(cls, aux, children):
        name, a_axes, b_axes, s_axes = aux
        return cls(name, *children, a_axes, b_axes, s_axes)

    def factors(self):
        """((array, axes) for A, B, s): each factor with the axes of ``w`` it follows."""
        return ((self.a, self.a_axes), (self.b, self.b_axes), (self.s, self.s_axes))

    def with_factors(self, w, factors) -> Tracked:
        (a, a_axes), (b, b_axes), (s, s_axes) = factors
        return Tracked(self.name, w, a, b, s, a_axes, b_axes, s_axes)

    def kind(self, axis: int) -> str:
        if axis in self.s_axes:
            return _STACKED
        return _INPUT if axis in self.a_axes else _OUTPUT


def track(name: str, w, a, b, s) -> Tracked:
    """W (*stack, *in, *out) with A (*stack, *in, r), B (*stack, r, *out), s (*stack,)."""
    lay = _layout.check_fits(name, w.shape, a.shape, b.shape, s.shape)
    stack, n_in = lay.stack, lay.stack + lay.fan_in
    return Tracked(
        name,
        w,
        a,
        jnp.moveaxis(b, stack, -1),
        s,
        range(n_in),
        [*range(stack), *range(n_in, w.ndim)],
        range(stack),
    )


class UnsupportedUse(ValueError):
    """An adapted weight reaches an operation the factored forward cannot adapt."""


def _unsupported(t: Tracked, primitive: str, why: str) -> UnsupportedUse:
    return UnsupportedUse(
        f"lj.apply: the adapted weight {t.name} reaches `{primitive}`, {why}. The factored "
        "forward adapts a weight that reaches a dot_general or an embedding lookup through "
        "reshapes, transposes, casts and slices; adapt another weight, or run the model on "
        "lj.materialize(params)."
    )


def evaluate(closed: jex.ClosedJaxpr, args: Sequence[Any]) -> list[Any]:
    """The outputs of a closed jaxpr on `args`, some of them `Tracked`."""
    return _eval_jaxpr(closed.jaxpr, closed.consts, args)


def _eval_jaxpr(jaxpr: jex.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jex.Literal) else env[v]

    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        with eqn.ctx.manager:  # the equation's context (compute type, XLA metadata)
            if any(isinstance(v, Tracked) for v in invals):
                outs = _rule(eqn.primitive.name)(eqn, invals)
            else:
                outs = _bind(eqn, *invals)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for var, val in zip(eqn.outvars, outs, strict=True):
            if not isinstance(var, jex.DropVar):
                env[var] = val
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn, *invals):
    """The equation's own primitive on plain values (a view of W on W')."""
    bound = eqn.primitive.get_bind_params(eqn.params)
    # Older JAX releases return (subfuns, params), newer ones the params alone.
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    return eqn.primitive.bind(*subfuns, *invals, **params)


def _rule(name: str) -> Callable:
    return _RULES.get(name, _no_rule(name))


def _no_rule(name):
    def raise_for(eqn, invals):
        t = next(v for v in invals if isinstance(v, Tracked))
        raise _unsupported(t, name, "which is not a view of the weight nor a matmul with it")

    return raise_for


# ---------------------------------------------------------------- views of W


def _identity_view(eqn, invals):
    (t,) = invals
    return t.with_factors(_bind(eqn, t.w), t.factors())


def _convert(eqn, invals):
    (t,) = invals
    if not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
        raise _unsupported(t, "convert_element_type", "a cast to a non-float dtype")
    return _identity_view(eqn, invals)


def _transpose(eqn, invals):
    (t,) = invals
    perm = eqn.params["permutation"]
    new = {old: j for j, old in enumerate(perm)}
    return t.with_factors(_bind(eqn, t.w), _remap(t.factors(), new))


def _remap(factors, new: dict[int, int]):
    return [(f, tuple(new[k] for k in axes)) for f, axes in factors]


def _drop_unit_axes(t: Tracked, w, drop: Sequence[int]) -> Tracked:
    """`t` with the size-1 axes `drop` squeezed out (giving `w`)."""
    drop = set(drop)
    keep = {k: k - sum(d < k for d in drop) for k in range(t.w.ndim) if k not in drop}
    factors = []
    for f, axes in t.factors():
        gone = [j for j, k in enumerate(axes) if k in drop]
        factors.append((jnp.squeeze(f, gone), tuple(keep[k] for k in axes if k not in drop)))
    return t.with_factors(w, factors)


def _squeeze(eqn, invals):
    (t,) = invals
    dims = [d % t.w.ndim for d in eqn.params["dimensions"]]
    return _drop_unit_axes(t, _bind(eqn, t.w), dims)


def _new_stacked_axes(t: Tracked, w, positions: dict[int, int], new: dict[int, int]):
    """`t` with its axes moved as `positions` says (old → new) and the new axes `new`
    ({position: size}) added as stacked axes of every factor (broadcast)."""
    factors = []
    for f, axes in _remap(t.factors(), positions):
        for pos, size in new.items():
            f = jnp.broadcast_to(f[None], (size, *f.shape))
            axes = (pos, *axes)
        factors.append((f, axes))
    return t.with_factors(w, factors)


def _broadcast_in_dim(eqn, invals):
    t = invals[0]
    if len(invals) > 1:
        raise _unsupported(t, "broadcast_in_dim", "a broadcast to a dynamic shape")
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    grown = [k for k, d in enumerate(dims) if t.w.shape[k] != shape[d]]
    if grown:  # a size-1 axis broadcast to a larger size: a new stacked axis
        t = _drop_unit_axes(t, jnp.squeeze(t.w, grown), grown)
        dims = [d for k, d in enumerate(dims) if k not in grown]
    new = {p: shape[p] for p in range(len(shape)) if p not in dims}
    return _new_stacked_axes(t, _bind(eqn, invals[0].w), dict(enumerate(dims)), new)


def _reshape(eqn, invals):
    t = invals[0]
    if eqn.params.get("dimensions") is not None or len(invals) > 1:
        raise _unsupported(t, "reshape", "a reshape with a dimension order or dynamic shape")
    w = _bind(eqn, t.w)
    units = [k for k, n in enumerate(t.w.shape) if n == 1]
    t = _drop_unit_axes(t, jnp.squeeze(t.w, units), units)
    target = [n for n in w.shape if n != 1]
    groups = _reshape_groups(t.w.shape, target)
    for old, _ in groups:
        if len({t.kind(k) for k in old}) > 1:
            raise _unsupported(
                t, "reshape", "which merges or splits its input, output or stacked axes together"
            )
    new_of = {k: j for j, (old, _) in enumerate(groups) for k in old}
    factors = []
    for f, axes in t.factors():
        order = sorted(range(len(axes)), key=lambda j: axes[j])
        f = jnp.transpose(f, [*order, *range(len(axes), f.ndim)])
        in_f = sorted({new_of[axes[j]] for j in order})
        sizes = [n for g in in_f for n in (target[k] for k in groups[g][1])]
        f = jnp.reshape(f, (*sizes, *f.shape[len(axes) :]))
        factors.append((f, tuple(k for g in in_f for k in groups[g][1])))
    t = t.with_factors(jnp.reshape(t.w, target), factors)
    kept = [p for p, n in enumerate(w.shape) if n != 1]
    new = {p: 1 for p in range(w.ndim) if w.shape[p] == 1}
    return _new_stacked_axes(t, w, dict(enumerate(kept)), new)


def _reshape_groups(old: Sequence[int], new: Sequence[int]) -> list[tuple[list, list]]:
    """Pairs (old axes, new axes) of equal size product that a row-major reshape maps onto
    each other, for shapes without size-1 axes."""
    groups, i, j = [], 0, 0
    while i < len(old):
        gi, gj = [i], [j]
        po, pn = old[i], new[j]
        while po != pn:
            if po < pn:
                i += 1
                gi.append(i)
                po *= old[i]
            else:
                j += 1
                gj.append(j)
                pn *= new[j]
        groups.append((gi, gj))
        i, j = i + 1, j + 1
    return groups


def _slice(eqn, invals):
    (t,) = invals
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * t.w.ndim
    factors = []
    for f, axes in t.factors():
        for j, k in enumerate(axes):
            f = lax.slice_in_dim(f, start[k], limit[k], strides[k], axis=j)
        factors.append((f, axes))
    return t.with_factors(_bind(eqn, t.w), factors)


def _split(eqn, invals):
    """Consecutive slices along one axis (``jnp.split``: a fused projection's parts)."""
    (t,) = invals
    axis, sizes = eqn.params["axis"], eqn.params["sizes"]
    parts, start = [], 0
    for w, size in zip(_bind(eqn, t.w), sizes, strict=True):
        factors = []
        for f, axes in t.factors():
            if axis in axes:
                f = lax.slice_in_dim(f, start, start + int(size), axis=axes.index(axis))
            factors.append((f, axes))
        parts.append(t.with_factors(w, factors))
        start += int(size)
    return parts


def _dynamic_slice(eqn, invals):
    t, starts = invals[0], invals[1:]
    if any(isinstance(v, Tracked) for v in starts) or len(starts) != t.w.ndim:
        raise _unsupported(t, "dynamic_slice", "a slice at positions read off the weight")
    sizes = eqn.params["slice_sizes"]
    factors = []
    for f, axes in t.factors():
        for j, k in enumerate(axes):
            f = lax.dynamic_slice_in_dim(f, starts[k], sizes[k], axis=j)
        factors.append((f, axes))
    return t.with_factors(_bind(eqn, t.w, *starts), factors)


_TAKE_MODES = {
    lax.GatherScatterMode.CLIP: "clip",
    lax.GatherScatterMode.FILL_OR_DROP: "fill",
    lax.GatherScatterMode.PROMISE_IN_BOUNDS: "promise_in_bounds",
}


def _gather(eqn, invals):
    """A lookup along one axis (``jnp.take``): rows of A for an input axis (an embedding
    table), of B for an output axis, of every factor for a stacked axis."""
    t, indices = invals
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    if isinstance(indices, Tracked):
        raise _unsupported(indices, "gather", "used as indices")
    one_axis = (
        len(dn.start_index_map) == 1
        and tuple(dn.collapsed_slice_dims) == tuple(dn.start_index_map)
        and not getattr(dn, "operand_batching_dims", ())
        and indices.shape[-1] == 1
        and all(n == t.w.shape[k] for k, n in enumerate(sizes) if k != dn.start_index_map[0])
    )
    mode = _TAKE_MODES.get(eqn.params.get("mode"))
    if not one_axis or mode is None:
        raise _unsupported(t, "gather", "a gather other than a lookup along one axis")
    axis, ids = dn.start_index_map[0], indices[..., 0]
    w = _bind(eqn, t.w, indices)
    batch_pos = [p for p in range(w.ndim) if p not in dn.offset_dims]
    offset = dict(zip([k for k in range(t.w.ndim) if k != axis], dn.offset_dims, strict=True))
    fill = eqn.params.get("fill_value")
    factors = []
    for f, axes in t.factors():
        if axis in axes:
            j = axes.index(axis)
            f = jnp.take(f, ids, axis=j, mode=mode, fill_value=fill)
            axes = (*(offset[k] for k in axes[:j]), *batch_pos, *(offset[k] for k in axes[j + 1 :]))
        else:
            axes = tuple(offset[k] for k in axes)
        factors.append((f, axes))
    looked_up = t.with_factors(w, factors)
    return looked_up if t.kind(axis) == _STACKED else _dense(looked_up)


def _dense(t: Tracked):
    """W' + s'·A'·B' as an array: for a view as small as an activation (a lookup)."""
    letters = _letters(t.w.ndim + 1)
    sub = lambda axes: "".join(letters[k] for k in axes)  # noqa: E731
    rank, out = letters[-1], letters[:-1]
    (a, a_axes), (b, b_axes), (s, s_axes) = t.factors()
    delta = jnp.einsum(
        f"{sub(a_axes)}{rank},{sub(b_axes)}{rank},{sub(s_axes)}->{out}",
        *(f.astype(t.w.dtype) for f in (a, b, s)),
    )
    return t.w + delta


def _letters(n: int) -> str:
    if n > len(string.ascii_letters):
        raise ValueError(f"lj.apply: a contraction over {n} axes is more than einsum can name")
    return string.ascii_letters[:n]


# ---------------------------------------------------------------- consumers


def _dot_general(eqn, invals):
    """x·W' + s·((x·A')·B'), or W'·x likewise, with the primitive's dimension numbers."""
    lhs, rhs = invals
    if isinstance(lhs, Tracked) and isinstance(rhs, Tracked):
        raise _unsupported(lhs, "dot_general", f"multiplied by another adapted weight {rhs.name}")
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    base = _bind(eqn, *(v.w if isinstance(v, Tracked) else v for v in invals))
    letters = iter(string.ascii_letters)
    lhs_nd = (lhs.w if isinstance(lhs, Tracked) else lhs).ndim
    rhs_nd = (rhs.w if isinstance(rhs, Tracked) else rhs).ndim
    if lhs_nd + rhs_nd + 1 > len(string.ascii_letters):
        raise _unsupported(lhs if isinstance(lhs, Tracked) else rhs, "dot_general", "too many axes")
    lhs_sub = [next(letters) for _ in range(lhs_nd)]
    rhs_sub = [next(letters) for _ in range(rhs_nd)]
    for i, j in zip((*lc, *lb), (*rc, *rb), strict=True):
        rhs_sub[j] = lhs_sub[i]
    out_sub = (
        [lhs_sub[i] for i in lb]
        + [c for i, c in enumerate(lhs_sub) if i not in (*lc, *lb)]
        + [c for j, c in enumerate(rhs_sub) if j not in (*rc, *rb)]
    )
    t, x, t_sub, x_sub, contracted = (
        (lhs, rhs, lhs_sub, rhs_sub, lc)
        if isinstance(lhs, Tracked)
        else (rhs, lhs, rhs_sub, lhs_sub, rc)
    )
    rank = next(letters)
    (a, a_axes), (b, b_axes), (s, s_axes) = t.factors()
    a_sub = "".join(t_sub[k] for k in a_axes) + rank
    b_sub = "".join(t_sub[k] for k in b_axes) + rank
    s_sub = "".join(t_sub[k] for k in s_axes)
    out = "".join(out_sub)
    input_first = any(t.kind(k) == _INPUT for k in contracted) or not any(
        t.kind(k) == _OUTPUT for k in contracted
    )
    (first, first_sub), (second, second_sub) = (
        ((a, a_sub), (b, b_sub)) if input_first else ((b, b_sub), (a, a_sub))
    )
    dtype = base.dtype
    x_str = "".join(x_sub)
    keep = "".join(dict.fromkeys(c for c in x_str + first_sub + s_sub if c in second_sub + out))
    precision = eqn.params.get("precision")
    xa = jnp.einsum(
        f"{x_str},{first_sub},{s_sub}->{keep}",
        x.astype(dtype),
        first.astype(dtype),
        s.astype(dtype),
        precision=precision,
        preferred_element_type=dtype,
    )
    term = jnp.einsum(
        f"{keep},{second_sub}->{out}",
        xa,
        second.astype(dtype),
        precision=precision,
        preferred_element_type=dtype,
    )
    return base + term


# ---------------------------------------------------------------- nested jaxprs


def _inline(param: str):
    def rule(eqn, invals):
        closed = eqn.params[param]
        return _eval_jaxpr(closed.jaxpr, closed.consts, invals)

    return rule


def _remat(eqn, invals):
    jaxpr = eqn.params["jaxpr"]
    body = jax.checkpoint(
        lambda *args: _eval_jaxpr(jaxpr, [], args),
        prevent_cse=eqn.params["prevent_cse"],
        policy=eqn.params["policy"],
    )
    return body(*invals)


def _scan(eqn, invals):
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    consts, init, xs = (
        invals[:n_consts],
        invals[n_consts : n_consts + n_carry],
        invals[n_consts + n_carry :],
    )
    for v in init:
        if isinstance(v, Tracked):
            raise _unsupported(v, "scan", "as a loop carry")
    xs = [_leading_stacked(v, "scan") if isinstance(v, Tracked) else v for v in xs]
    closed = p["jaxpr"]

    def body(carry, x):
        outs = _eval_jaxpr(closed.jaxpr, closed.consts, [*consts, *carry, *x])
        _check_plain(outs, eqn, "scan")
        return outs[:n_carry], outs[n_carry:]

    carry, ys = lax.scan(
        body, list(init), xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    return [*carry, *ys]


def _leading_stacked(t: Tracked, primitive: str) -> Tracked:
    """A `Tracked` whose arrays all lead with W's axis 0 (sliced by a scan) and whose axes
    are those of one slice: what the scan body sees."""
    if t.kind(0) != _STACKED:
        raise _unsupported(t, primitive, f"which slices it along an {t.kind(0)} axis")
    factors = []
    for f, axes in t.factors():
        j = axes.index(0)
        factors.append((jnp.moveaxis(f, j, 0), tuple(k - 1 for k in axes if k != 0)))
    return t.with_factors(t.w, factors)


def _check_plain(outs, eqn, primitive):
    for v in outs:
        if isinstance(v, Tracked):
            raise _unsupported(v, primitive, "which returns the weight itself")


def _cond(eqn, invals):
    index, operands = invals[0], invals[1:]
    branches = [
        (lambda closed: lambda *ops: _plain(_eval_jaxpr(closed.jaxpr, closed.consts, ops), eqn))(
            closed
        )
        for closed in eqn.params["branches"]
    ]
    return lax.switch(index, branches, *operands)


def _plain(outs, eqn):
    _check_plain(outs, eqn, eqn.primitive.name)
    return outs


def _while(eqn, invals):
    p = eqn.params
    n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts = invals[:n_cond], invals[n_cond : n_cond + n_body]
    init = invals[n_cond + n_body :]
    for v in init:
        if isinstance(v, Tracked):
            raise _unsupported(v, "while", "as a loop carry")
    cond_j, body_j = p["cond_jaxpr"], p["body_jaxpr"]
    out = lax.while_loop(
        lambda c: _eval_jaxpr(cond_j.jaxpr, cond_j.consts, [*cond_consts, *c])[0],
        lambda c: _plain(_eval_jaxpr(body_j.jaxpr, body_j.consts, [*body_consts, *c]), eqn),
        list(init),
    )
    return out


_RULES: dict[str, Callable] = {
    "convert_element_type": _convert,
    "copy": _identity_view,
    "copy_p": _identity_view,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "split": _split,
    "gather": _gather,
    "dot_general": _dot_general,
    "pjit": _inline("jaxpr"),
    "jit": _inline("jaxpr"),
    "closed_call": _inline("call_jaxpr"),
    "custom_jvp_call": _inline("call_jaxpr"),
    "custom_vjp_call": _inline("call_jaxpr"),
    "remat2": _remat,
    "checkpoint": _remat,
    "scan": _scan,
    "cond": _cond,
    "while": _while,
}

__all__ = ["Tracked", "UnsupportedUse", "evaluate", "track"]
