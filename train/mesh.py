"""Every sharding decision of a training run, in one place.

The device mesh has three named axes, sized by ``mesh`` in the config:

``data``
    pure data parallelism: batch rows are split, parameters are replicated.
``fsdp``
    batch rows are split *and* parameters are sharded along their ``embed`` axis
    (ZeRO-3 style: XLA all-gathers a weight where it is used).
``tensor``
    Megatron-style model parallelism over heads, MLP width and vocabulary.

The model names every parameter axis (``models.logical_axes``); the base policy
(``mesh.base``, :data:`BASE_RULES`) maps those names onto mesh axes: ``fsdp`` (the
default) as above, ``tensor`` (no ``embed`` sharding: each weight is split over
``tensor`` only and whole along ``fsdp``), or ``replicated``. LoRA factors
(``mesh.factors``) either ``inherit`` the weight's sharding (``lj.partition_specs``: A
takes the kernel's input axes, B its output axes, the rank is replicated) or are
``replicated``: a few small tensors that are then never gathered, which MaxText and
torchtitan chose. The optimizer state follows the parameter it belongs to
(:func:`state_shardings`), and a batch ``[rows, L]`` (``[micro, rows, L]`` with
gradient accumulation) is split over ``data`` x ``fsdp`` along its rows.
:func:`put_batch` puts a process's rows onto the mesh (the base is loaded onto it:
train/setup.py).

A mesh axis that does not divide a dimension is dropped for that dimension (the
dimension is replicated instead), so odd sizes work on any mesh, only less sharded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import lora_jax as lj
from train.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch's rows are split over

# logical axis name (models.logical_axes) -> mesh axis; names not listed are replicated.
LOGICAL_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,  # the stacked axis of scanned layers
}
# flax logical axis rules of the activations the decoder constrains (models/decoder.py
# RESIDUAL_AXES, LOGITS_AXES): rows over data x fsdp, the vocabulary over tensor. Pinning
# them keeps XLA from splitting a matmul along the fsdp-sharded contraction instead (it
# would then hold every row's [L, V] logits on each device). Attention heads over tensor,
# as their projections split them: TPU's splash kernel runs per device on that split.
ACTIVATION_RULES = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_vocab", "tensor"),
    ("activation_heads", "tensor"),
)
# mesh.base -> the rules of the base weights (and of factors that inherit them)
BASE_RULES: dict[str, dict[str, str | None]] = {
    "fsdp": LOGICAL_RULES,
    "tensor": {**LOGICAL_RULES, "embed": None},
    "replicated": {},
}


def mesh_shape(cfg: MeshConfig, device_count: int) -> dict[str, int]:
    """Axis sizes with the one ``-1`` (if any) filled so that they use every device.

    Without a ``-1`` the product may be smaller than ``device_count``: the mesh then
    uses the first devices only (single-process runs; e.g. a 1-device reference run).
    """
    sizes = {axis: getattr(cfg, axis) for axis in AXES}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    fill = [axis for axis, s in sizes.items() if s == -1]
    if fill:
        if device_count % fixed:
            raise ConfigError(
                f"mesh {sizes}: the fixed axes ({fixed} devices) do not divide the "
                f"{device_count} devices; change the mesh.* sizes"
            )
        sizes[fill[0]] = device_count // fixed
    if math.prod(sizes.values()) > device_count:
        raise ConfigError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices but "
            f"{device_count} are available; lower the mesh.* sizes or set one to -1"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all global devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(cfg, len(devices))
    used = math.prod(sizes.values())
    if used < len(devices) and jax.process_count() > 1:
        raise ConfigError(
            f"mesh {sizes} uses {used} of {len(devices)} devices, which a "
            f"multi-process run cannot leave idle; set one mesh.* size to -1"
        )
    grid = np.asarray(devices[:used], dtype=object).reshape([sizes[a] for a in AXES])
    return Mesh(grid, AXES)


def spec_for(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, str | None] = LOGICAL_RULES,
) -> PartitionSpec:
    """The PartitionSpec of an array of ``shape`` whose axes carry logical ``names``,
    mapped by ``rules``.

    A mesh axis is dropped (that dimension replicated) when it does not divide the
    dimension or is already used by an earlier dimension.
    """
    if len(names) != len(shape):
        raise ValueError(
            f"{len(names)} logical names {tuple(names)} for an array of shape {tuple(shape)}"
        )
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        axis = rules.get(name) if name is not None else None
        if axis is None or axis in used or size % mesh.shape[axis]:
            spec.append(None)
            continue
        used.add(axis)
        spec.append(axis)
    return PartitionSpec(*spec)


def param_shardings(
    logical_axes: Any, params: Any, mesh: Mesh, base: str = "fsdp", factors: str = "inherit"
) -> Any:
    """NamedShardings for ``params`` (base or adapted tree) from the base's logical names,
    under the ``base`` and ``factors`` policies (``mesh.base``, ``mesh.factors``).

    ``logical_axes`` is ``models.logical_axes(model)``, shaped like the *base* params;
    the leaves ``params`` adds (LoRA factors, scales, bias deltas) get their names from
    ``lj.partition_specs``. A quantized kernel (``model.quantize``, ``lj.QuantizedArray``)
    is replicated: its packed blocks run across the weight's axes.
    """
    base_rules = BASE_RULES[base]
    added_rules = base_rules if factors == "inherit" else {}
    base_paths = set(lj.flatten_paths(logical_axes))
    names = lj.flatten_paths(lj.partition_specs(logical_axes, params))

    def sharding(path: str, x: Any) -> Any:
        if isinstance(x, lj.QuantizedArray):  # its buffers have no logical axes: replicated
            return jax.tree.map(lambda _: replicated(mesh), x)
        rules = base_rules if path in base_paths else added_rules
        return NamedSharding(mesh, spec_for(names[path], x.shape, mesh, rules))

    shardings = {path: sharding(path, x) for path, x in lj.flatten_paths(params).items()}
    return lj.unflatten_paths(shardings, like=params)


def with_activation_rules(forward: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """``forward`` traced with :data:`ACTIVATION_RULES` on ``mesh`` in force."""

    def constrained(*args: Any, **kwargs: Any) -> Any:
        with (
            jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
            nn.logical_axis_rules(ACTIVATION_RULES),
        ):
            return forward(*args, **kwargs)

    return constrained


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, the RNG key, step counters)."""
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(
    tx: optax.GradientTransformation, params: Any, shardings: Any, mesh: Mesh
) -> dict[str, Any]:
    """Shardings of the train state of ``params`` (train/step.py ``init_state``), given
    the parameters' ``shardings``: a moment of ``tx`` is sharded like its parameter; the
    step, the RNG key and any other leaf of the optimizer state (step counts) are
    replicated."""
    state_shapes = jax.eval_shape(tx.init, params)
    opt_state = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        state_shapes,
        shardings,
        transform_non_params=lambda _: replicated(mesh),
    )
    return {
        "step": replicated(mesh),
        "params": shardings,
        "opt_state": opt_state,
        "rng": replicated(mesh),
    }


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows (the second-to-last axis) over ``data`` x ``fsdp``; other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(*([None] * (ndim - 2)), BATCH_AXES, None))


def put_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """One global array per field from this process's rows (``[..., rows/process, L]``)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
        for k, v in local.items()
    }


def check_batch_fits(batch_size: int, mesh: Mesh) -> None:
    """A global batch must split evenly over the ``data`` x ``fsdp`` devices."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise ConfigError(
            f"data.batch_size={batch_size} does not split over the {shards} "
            f"data x fsdp devices of mesh {dict(mesh.shape)}; make it a multiple "
            f"of {shards}"
        )
