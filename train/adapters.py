"""Bottleneck adapters, the LoRA paper's AdapterH and AdapterL baselines, as a method of the
pipeline: a tree transform (:func:`init`) and an apply wrapper (:func:`apply`) around the
unmodified ``models.Decoder``.

Designs (``method``), on a sublayer's output h_BxLxD (before the block's residual addition,
so the block becomes x + adapter(sublayer(norm(x)))):

* ``adapter_h`` (Houlsby et al. 2019): after every layer's attention and after its MLP,
  h + up(gelu(down(h))), GELU in its tanh form.
* ``adapter_l`` (Lin et al. 2020, as the LoRA paper describes AdapterL): after the MLP only,
  preceded by a LayerNorm: h + up(relu(down(LN(h)))), LN with its own scale and bias
  (epsilon: the model's ``norm_eps``).

down: (D, m) kernel + (m,) bias, up: (m, D) kernel + (D,) bias, m = ``adapter.bottleneck``.
Per adapted sublayer that is 2·D·m + m + D parameters (+ 2·D for AdapterL's LayerNorm):
:func:`parameter_count`. ``up`` starts at zero, so an adapted model starts as its base.

The parameters sit beside the sublayer's own, ``<layer>/<sublayer>/adapter/{down,up,norm}/
{kernel,bias,scale}``, with the layer axis first when the layers are scanned
(``layers/...``), so Flax hands each (scanned, rematerialised) sublayer its own slice.
Unlike LoRA, an adapter is a sequential extra layer that cannot be merged into W.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import lora_jax as lj
from models.layers import MLP, Attention

NAME = "adapter"  # the adapter's subtree inside a sublayer's params
INIT_STD = 0.02  # down-projection kernels are drawn from N(0, INIT_STD²)

# design -> the sublayers (decoder module names) it adapts
SUBLAYERS: dict[str, tuple[str, ...]] = {
    "adapter_h": ("self_attn", "mlp"),
    "adapter_l": ("mlp",),
}
# the sublayer's output projection, whose kernel's last axis is D
OUTPUT_KERNEL = {"self_attn": "o_proj/kernel", "mlp": "down_proj/kernel"}
MODULES = {"self_attn": Attention, "mlp": MLP}
# a sublayer's path in the decoder's params: unrolled layers_<i>/..., scanned layers/...,
# or a lone DecoderLayer's self_attn/..., mlp/...
SUBLAYER_PATH = re.compile(r"^(?:(layers_\d+|layers)/)?(self_attn|mlp)/")


def _check_design(design: str) -> None:
    if design not in SUBLAYERS:
        raise ValueError(f"unknown adapter design {design!r}; use one of {sorted(SUBLAYERS)}")


def parameter_count(design: str, hidden_size: int, num_layers: int, bottleneck: int) -> int:
    """Closed form of the parameters ``design`` adds to a decoder of ``num_layers`` layers
    of width D = ``hidden_size``: per adapted sublayer 2·D·m + m + D (down and up, with
    biases), plus 2·D for AdapterL's LayerNorm."""
    _check_design(design)
    D, m = hidden_size, bottleneck
    per_adapter = 2 * D * m + m + D + (2 * D if design == "adapter_l" else 0)
    return num_layers * len(SUBLAYERS[design]) * per_adapter


def init(key: jax.Array, params: Any, design: str, bottleneck: int) -> Any:
    """``params`` (of a ``models.Decoder`` or one ``DecoderLayer``) with an adapter of
    bottleneck m beside every sublayer ``design`` adapts: down kernel ~ N(0, 0.02²), the
    rest zero, LayerNorm scale one; float32, with the layer axis of scanned layers first.
    The base leaves are kept."""
    _check_design(design)
    if bottleneck < 1:
        raise ValueError(f"the adapter bottleneck must be >= 1; got {bottleneck}")
    flat = lj.flatten_paths(params)
    added = {}
    for path, leaf in sorted(flat.items()):
        found = SUBLAYER_PATH.match(path)
        if not found or path != f"{found.group(0)}{OUTPUT_KERNEL[found.group(2)]}":
            continue
        if found.group(2) not in SUBLAYERS[design]:
            continue
        stacked = (leaf.shape[0],) if found.group(1) == "layers" else ()
        D, m = leaf.shape[-1], bottleneck
        key, draw = jax.random.split(key)
        prefix = found.group(0) + NAME
        added |= {
            f"{prefix}/down/kernel": INIT_STD * jax.random.normal(draw, (*stacked, D, m)),
            f"{prefix}/down/bias": jnp.zeros((*stacked, m)),
            f"{prefix}/up/kernel": jnp.zeros((*stacked, m, D)),
            f"{prefix}/up/bias": jnp.zeros((*stacked, D)),
        }
        if design == "adapter_l":
            added |= {
                f"{prefix}/norm/scale": jnp.ones((*stacked, D)),
                f"{prefix}/norm/bias": jnp.zeros((*stacked, D)),
            }
    if not added:
        raise ValueError(
            f"{design}: no {' or '.join(SUBLAYERS[design])} sublayer found in the params "
            f"(expected paths like layers_0/mlp/down_proj/kernel)"
        )
    return lj.unflatten_paths(flat | added)


def trainable_mask(params: Any) -> Any:
    """True on every adapter leaf (a path through an ``adapter`` subtree of a sublayer)."""
    flat = lj.flatten_paths(params)
    pattern = re.compile(rf"{SUBLAYER_PATH.pattern}{NAME}/")
    return lj.unflatten_paths({p: bool(pattern.match(p)) for p in flat}, like=params)


def adapt(h_BxLxD: jax.Array, adapter: Any, design: str, norm_eps: float) -> jax.Array:
    """The adapter of ``design`` on a sublayer output h_BxLxD: h + up(act(down(h'))),
    h' = h for AdapterH (act: tanh GELU), LN(h) for AdapterL (act: ReLU). ``adapter``: its
    params, down {kernel (D, m), bias (m,)}, up {kernel (m, D), bias (D,)}[, norm {scale
    (D,), bias (D,)}], cast to h's dtype. Returns (B, L, D)."""
    p = jax.tree.map(lambda x: x.astype(h_BxLxD.dtype), adapter)
    x_BxLxD = h_BxLxD
    if design == "adapter_l":
        mean_BxLx1 = x_BxLxD.mean(-1, keepdims=True)
        var_BxLx1 = jnp.square(x_BxLxD - mean_BxLx1).mean(-1, keepdims=True)
        x_BxLxD = (x_BxLxD - mean_BxLx1) * jax.lax.rsqrt(var_BxLx1 + norm_eps)
        x_BxLxD = x_BxLxD * p["norm"]["scale"] + p["norm"]["bias"]
    down_BxLxM = x_BxLxD @ p["down"]["kernel"] + p["down"]["bias"]
    act = jax.nn.relu if design == "adapter_l" else functools.partial(jax.nn.gelu, approximate=True)
    return h_BxLxD + act(down_BxLxM) @ p["up"]["kernel"] + p["up"]["bias"]


@functools.cache  # one function object per (fn, design): models.generate jits on it
def apply(fn: Callable[..., Any], design: str) -> Callable[..., Any]:
    """``fn`` (``model.apply`` of a ``models.Decoder``) with the adapters of ``design`` run
    on the outputs of the sublayers it adapts, read from each sublayer's ``adapter``
    params (:func:`init`); the model itself is unchanged (``nn.intercept_methods``)."""
    _check_design(design)
    modules = tuple(MODULES[s] for s in SUBLAYERS[design])

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, modules):
            return out
        adapter = module.variables.get("params", {}).get(NAME)
        if adapter is None:
            raise ValueError(
                f"{design}: {'/'.join(module.path)} has no '{NAME}' params; build the params "
                f"with train.adapters.init(key, params, {design!r}, bottleneck)"
            )
        return adapt(out, adapter, design, module.config.norm_eps)

    @functools.wraps(fn)
    def adapted(*args, **kwargs):
        with nn.intercept_methods(interceptor):
            return fn(*args, **kwargs)

    return adapted
