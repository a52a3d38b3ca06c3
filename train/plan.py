"""``lora-jax plan``: compile the train step of a config for a target you need not have, and
say what it costs per device.

    lora-jax plan CONFIG [key=value ...] (--topology NAME | --devices N) [--search] [--json OUT]

The step compiled is the one ``lora-jax train`` runs (train/setup.py ``build_steps``:
the same model, method, shardings, optimizer, remat and micro-batching), from abstract
inputs (``jax.ShapeDtypeStruct`` with shardings): no weight is read or made. The target
is a TPU slice by its ``jax.experimental.topologies`` name (``v5e:16x16``, ``v5p:4x4x8``,
``v6e:8x8``; the TPU compiler, libtpu, the ``[tpu-plan]`` extra, compiles for it on a
machine without a TPU) or N host CPU devices.

Per device it reports XLA's own figures (``compiled.memory_analysis()``: argument,
output, temporary bytes; total = arguments + outputs - donated aliases + temporaries)
against the chip's memory; the compiled FLOPs (``cost_analysis()``) beside the model
FLOPs of :func:`model_flops`; every collective in the compiled HLO with its count and
bytes per step (loop bodies counted as often as their loop runs); and a roofline lower
bound on the step time. The same plan for full fine-tuning is made beside a LoRA or
BitFit one. ``--search`` compiles the config's variations (:func:`candidates`) and ranks
those that fit by that bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

import lora_jax as lj
import models
from train import mesh as mesh_lib
from train import method as method_lib
from train.config import ConfigError, RunConfig, load_config
from train.setup import Steps, build_steps

GiB = 2**30
BATCH_FIELDS = ("input_ids", "positions", "segment_ids", "loss_mask")  # int32 [K, B, L]
MFU_40 = "mfu_40"  # the key of tokens/s/chip at 40% model-FLOPs utilisation
SCHEDULE_STEPS = 1000  # updates the learning-rate schedule assumes without optim.max_steps


@dataclass(frozen=True)
class Chip:
    """One accelerator chip's published figures (per chip)."""

    name: str
    hbm_bytes: int  # memory capacity
    peak_flops: float  # bf16 dense FLOP/s
    hbm_bytes_per_s: float  # memory bandwidth
    source: str


# device_kind -> figures from Google Cloud's TPU pages (the address in ``source``)
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1228e9, "https://cloud.google.com/tpu/docs/v4"),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
}


@dataclass(frozen=True)
class Target:
    """The devices a plan compiles for."""

    name: str  # the topology name, or "cpu:N"
    devices: list[Any]
    chip: Chip | None  # None for CPU devices (no published peak)
    capacity: int  # bytes of memory per device


def tpu_target(topology: str) -> Target:
    """The chips of a TPU slice by ``jax.experimental.topologies`` name, e.g. ``v5e:16x16``."""
    from jax.experimental import topologies

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
    # compiling holds no chip, so other processes may use libtpu at the same time
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # what a TPU VM's environment would say; off one, libtpu warns at start-up without them
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", _accelerator_type(topology))
    try:
        description = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topology,
            chip_config_name="default",
            chips_per_host_bounds=(2, 2, 1),
            num_slices=1,
        )
    except Exception as e:  # libtpu missing or the name unknown: both are the user's to fix
        raise ConfigError(
            f"--topology {topology}: the TPU compiler cannot describe it ({' '.join(str(e).split())}); "
            f"give a name such as v5e:16x16, v5p:4x4x8 or v6e:8x8, and install the TPU "
            f"compiler with: pip install 'lora-jax[tpu-plan]'"
        ) from None
    devices = list(description.devices)
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise ConfigError(f"--topology {topology}: no published figures for {kind!r} chips")
    return Target(topology, devices, CHIPS[kind], CHIPS[kind].hbm_bytes)


def _accelerator_type(topology: str) -> str:
    """Cloud TPU's accelerator type of a topology name: ``v5e:2x2`` -> ``v5litepod-4``."""
    generation, _, shape = topology.partition(":")
    chips = math.prod(int(x) for x in shape.split("x") if x.isdigit()) if shape else 1
    name = {"v5e": "v5litepod", "v6e": "v6e"}.get(generation, generation)
    return f"{name}-{chips * (2 if generation in ('v4', 'v5p') else 1)}"


def cpu_target(count: int) -> Target:
    """``count`` host CPU devices; each is given an equal share of the host's memory."""
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backend started already: fine if it has the devices
        if jax.device_count("cpu") < count:
            raise ConfigError(
                f"--devices {count}: this process has {jax.device_count('cpu')} CPU devices; "
                f"set XLA_FLAGS=--xla_force_host_platform_device_count={count}"
            ) from None
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Target(f"cpu:{count}", jax.devices("cpu")[:count], None, host // count)


def target_mesh(cfg: RunConfig, target: Target) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh of ``cfg.mesh`` over every device of ``target``
    (a TPU slice in the order of its interconnect)."""
    sizes = mesh_lib.mesh_shape(cfg.mesh, len(target.devices))
    if math.prod(sizes.values()) != len(target.devices):
        raise ConfigError(
            f"mesh {sizes} does not use all {len(target.devices)} devices of "
            f"{target.name}; set one mesh.* size to -1"
        )
    shape = [sizes[a] for a in mesh_lib.AXES]
    if target.chip is not None:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, target.devices, allow_split_physical_axes=True)
    else:
        grid = np.asarray(target.devices, dtype=object).reshape(shape)
    return Mesh(grid, mesh_lib.AXES)


@dataclass(frozen=True)
class Abstract:
    """A run's inputs as shapes and shardings: what its train step is compiled from."""

    model: models.Decoder
    params: Any  # ShapeDtypeStructs of the params trained from
    steps: Steps
    state: Any  # ShapeDtypeStructs (with shardings) of the train state
    frozen: Any  # of the frozen half
    batch: dict[str, jax.ShapeDtypeStruct]  # int32 [K, B, L] fields


def abstract_run(cfg: RunConfig, mesh: Mesh) -> Abstract:
    """The model, params, train state and batch of ``cfg`` on ``mesh``, all abstract."""
    model, base = models.abstract_load(cfg.model.name, **method_lib.model_options(cfg))
    params, mask = method_lib.prepared_shapes(
        cfg.method, base, cfg.lora, cfg.model.quantize, cfg.adapter, cfg.prefix, model
    )
    steps = build_steps(cfg, model, params, mask, mesh, cfg.optim.max_steps or SCHEDULE_STEPS)
    frozen, trainable = lj.split(params, mask)
    state = _with(
        jax.eval_shape(lambda p: steps.init_state(p, jax.random.key(0)), trainable),
        steps.state,
    )
    frozen = _with(frozen, steps.frozen)
    shape = (cfg.optim.grad_accum_steps, cfg.data.batch_size, cfg.data.max_length)
    batch_sharding = mesh_lib.batch_sharding(mesh, 3)
    batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding) for k in BATCH_FIELDS
    }
    return Abstract(model, params, steps, state, frozen, batch)


def _with(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of ``tree`` (ShapeDtypeStructs with NamedShardings), from the
    specs alone: each dimension divided by the sizes of the mesh axes it is split over."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding: NamedSharding = x.sharding
        shard = list(x.shape)
        for dim, axes in enumerate(sharding.spec):
            for axis in (axes,) if isinstance(axes, str) else axes or ():
                shard[dim] //= sharding.mesh.shape[axis]
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def model_flops(cfg: RunConfig, model: models.Decoder, params: Any, method: str) -> float:
    """FLOPs of one update of ``cfg``'s model and batch, by formula (no compiler).

    Per token, with P the elements of the weight matrices (every projection and the output
    head; an embedding lookup is no matmul), F the elements of the LoRA factors A and B,
    and a = 4·L·H·Dh per layer (the attention scores and their weighted sum over all L
    keys; causal masking not subtracted):

    * full fine-tuning: 6·P + 3·a (forward 2·P + a; the backward pass twice that:
      activation and weight gradients);
    * LoRA: 4·P + 3·a + 6·F. The frozen weights need the forward and the activation
      gradient but no weight gradient (2·P each); x·A and (x·A)·B cost 2·F forward, and
      as much again for their activation gradients and for their weight gradients;
    * BitFit: 4·P + 3·a.

    Remat's recomputation is not counted (model FLOPs, as MFU defines them).
    """
    c = model.config
    flat = lj.flatten_paths(params)
    p = sum(math.prod(x.shape) for path, x in flat.items() if path.endswith("kernel"))
    if c.tie_word_embeddings:  # the head is the embedding, used as a matmul
        p += c.vocab_size * c.hidden_size
    f = sum(math.prod(x.shape) for path, x in flat.items() if path.endswith(("_lora_a", "_lora_b")))
    attention = 4 * cfg.data.max_length * c.num_heads * c.head_dim * c.num_layers
    per_token = (6 * p if method == "full" else 4 * p + 6 * f) + 3 * attention
    tokens = cfg.optim.grad_accum_steps * cfg.data.batch_size * cfg.data.max_length
    return float(per_token) * tokens


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s([a-z][\w\-]*)\((.*)$")
_CALLED = re.compile(
    r"\b(body|condition|calls|to_apply|branch_computations|called_computations)="
    r"(\{[^}]*\}|%?[\w.\-]+)"
)
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_BOUND = re.compile(r"s32\[\]\S*\s+constant\((\d+)\)")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")


@dataclass
class _Computation:
    shapes: dict[str, str]  # instruction name -> its result type
    matmul_flops: float = 0.0
    collectives: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    calls: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (callee, how)
    trip_counts: dict[str, int] = dataclasses.field(default_factory=dict)  # body -> runs
    conditions: dict[str, str] = dataclasses.field(default_factory=dict)  # body -> condition
    bound: int | None = None  # a loop condition's s32 constant (``i < bound``)


def hlo_costs(hlo: str) -> tuple[float, dict[str, dict[str, int]]]:
    """(matmul FLOPs, ``{kind: {"count", "bytes"}}`` of collectives) of one run of the
    compiled ``hlo`` (text), per device, each loop body counted as often as its loop runs.

    XLA's ``cost_analysis()`` counts a loop body once, so a model whose layers are one
    scanned body would show the FLOPs of one layer; here a ``while`` body is weighted by
    XLA's ``known_trip_count`` or else by the bound its condition compares the counter
    with. FLOPs are those of ``dot`` (2 x output elements x contracted size) and
    ``convolution`` ops (2 x output elements x kernel elements per output feature, as
    dense); a collective's bytes are its result's (an async ``-start``: its largest
    array, the gathered or permuted one).
    """
    computations: dict[str, _Computation] = {}
    order: list[str] = []
    entry, current = None, None
    for line in hlo.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = _Computation({})
            computations[head.group(2)] = current
            order.append(head.group(2))
            entry = head.group(2) if head.group(1) else entry
            continue
        instruction = _INSTRUCTION.match(line) if current is not None else None
        if instruction is None:
            continue
        name, result, op, rest = instruction.groups()
        current.shapes[name] = result
        bound = _BOUND.search(line)
        if bound:
            current.bound = int(bound.group(1))
        if op in ("dot", "convolution"):
            current.matmul_flops += _matmul_flops(op, result, rest, current.shapes)
        kind = op.removesuffix("-start")
        if kind in COLLECTIVES:
            sizes = [_bytes(dtype, dims) for dtype, dims in _ARRAY.findall(result)]
            current.collectives.append((kind, max(sizes) if op.endswith("-start") else sum(sizes)))
        for how, names in _CALLED.findall(rest):
            for callee in re.findall(r"[\w.\-]+", names):
                current.calls.append((callee, how))
        if op == "while":
            called = dict(_CALLED.findall(rest))
            body, condition = called["body"].lstrip("%"), called["condition"].lstrip("%")
            trips = _TRIP_COUNT.search(rest)
            if trips:
                current.trip_counts[body] = int(trips.group(1))
            current.conditions[body] = condition
    if entry is None:
        return 0.0, {}
    runs = dict.fromkeys(order, 0)
    runs[entry] = 1
    for name in reversed(order):  # a computation is printed before any that calls it
        c = computations[name]
        for callee, how in c.calls:
            if callee not in runs:
                continue
            times = 1
            if how == "body":
                condition = computations.get(c.conditions.get(callee, ""))
                times = c.trip_counts.get(callee) or (condition.bound if condition else None) or 1
            runs[callee] += runs[name] * times
    flops = sum(runs[n] * c.matmul_flops for n, c in computations.items())
    out: dict[str, dict[str, int]] = {}
    for name, c in computations.items():
        for kind, size in c.collectives:
            totals = out.setdefault(kind, {"count": 0, "bytes": 0})
            totals["count"] += runs[name]
            totals["bytes"] += runs[name] * size
    return flops, out


def _dims(result: str) -> list[int]:
    match = _ARRAY.search(result)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def _bytes(dtype: str, dims: str) -> int:
    size = 1 if dtype == "pred" else 2 if dtype == "bf16" else int(re.sub(r"\D", "", dtype)) // 8
    return math.prod(int(d) for d in dims.split(",") if d) * size


def _matmul_flops(op: str, result: str, rest: str, shapes: dict[str, str]) -> float:
    operands = _OPERAND.findall(rest.split(")", 1)[0])
    out = math.prod(_dims(result))
    if op == "dot":
        lhs = _dims(shapes.get(operands[0], ""))
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        axes = [int(a) for a in contracting.group(1).split(",") if a] if contracting else []
        return 2.0 * out * math.prod(lhs[a] for a in axes if a < len(lhs))
    kernel = _dims(shapes.get(operands[1], "")) if len(operands) > 1 else []
    labels = re.search(r"dim_labels=\w+_(\w+)->", rest)
    if not kernel or not labels or "o" not in labels.group(1):
        return 0.0
    groups = re.search(r"feature_group_count=(\d+)", rest)
    per_output = math.prod(kernel) / kernel[labels.group(1).index("o")]
    # a window over an input dilated by d meets a real element every d taps (XLA writes a
    # batched matmul as such a convolution: window = dilation = the batch size)
    window = re.search(r"window=\{size=([\dx]+)(?:.*?lhs_dilate=([\dx]+))?", rest)
    if window:
        sizes = [int(x) for x in window.group(1).split("x")]
        dilations = [int(x) for x in window.group(2).split("x")] if window.group(2) else []
        for size, dilation in zip(sizes, dilations):
            per_output *= math.ceil(size / dilation) / size
    return 2.0 * out * per_output / (int(groups.group(1)) if groups else 1)


def plan(cfg: RunConfig, target: Target) -> dict[str, Any]:
    """Compile ``cfg``'s train step for ``target`` and report its per-device costs.

    A step the TPU compiler refuses for want of memory is a plan that does not fit: its
    temporaries are the compiler's figure from the refusal, and it has no FLOPs,
    collectives or bound (nothing was compiled).
    """
    cfg = method_lib.resolve(cfg)
    method_lib.check_targets(cfg)
    mesh = target_mesh(cfg, target)
    mesh_lib.check_batch_fits(cfg.data.batch_size, mesh)
    run = abstract_run(cfg, mesh)
    context = run.model.config.max_position_embeddings
    if cfg.data.max_length > context:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} exceeds the context of "
            f"{cfg.model.name!r} ({context} tokens); lower data.max_length"
        )
    devices = len(target.devices)
    tokens = cfg.optim.grad_accum_steps * cfg.data.batch_size * cfg.data.max_length
    held = {
        "frozen": shard_bytes(run.frozen),
        "state": shard_bytes(run.state),
        "batch": shard_bytes(run.batch),
    }
    result = {
        "topology": target.name,
        "devices": devices,
        "chip": dataclasses.asdict(target.chip) if target.chip else None,
        "method": cfg.method,
        "model": cfg.model.name,
        "mesh": dict(mesh.shape),
        "policy": policy(cfg),
        "tokens_per_step": tokens,
        "model_flops": model_flops(cfg, run.model, run.params, cfg.method) / devices,
    }
    try:
        compiled = _compile(run)
    except jax.errors.JaxRuntimeError as e:
        needed = _REFUSED.search(str(e))
        if needed is None:
            raise
        temp = round(float(needed.group(1)) * _UNITS[needed.group(2)])
        arguments = sum(held.values())
        return result | {
            "per_device": {
                "arguments": arguments,
                "output": None,
                "alias": None,
                "temp": temp,
                "total": arguments + temp,
                "capacity": target.capacity,
                **held,
            },
            "fits": False,
            "compiled_flops": None,
            "xla_cost_analysis_flops": None,
            "collectives": None,
            "step_time_lower_bound_s": None,
            "tokens_per_s_per_device": None,
            "refused": " ".join(str(e).split()),
        }
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    flops, collective_costs = hlo_costs(hlo)
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    bound, per_s = None, None
    if target.chip is not None:
        chip = target.chip
        bound = max(flops / chip.peak_flops, cost.get("bytes accessed", 0.0) / chip.hbm_bytes_per_s)
        per_s = {
            f"mfu_{round(100 * m)}": (tokens / devices)
            / (result["model_flops"] / (m * chip.peak_flops))
            for m in (1.0, 0.4)
        }
    return result | {
        "per_device": {
            "arguments": memory.argument_size_in_bytes,
            "output": memory.output_size_in_bytes,
            "alias": memory.alias_size_in_bytes,
            "temp": memory.temp_size_in_bytes,
            "total": total,
            "capacity": target.capacity,
            **held,
        },
        "fits": total <= target.capacity,
        "compiled_flops": flops,
        "xla_cost_analysis_flops": float(cost.get("flops", 0.0)),
        # Pallas (Mosaic) kernels in the step, e.g. splash attention: their FLOPs are in
        # neither figure above, since the compiler cannot look inside them
        "pallas_kernels": len(re.findall(r'custom_call_target="tpu_custom_call"', hlo)),
        "collectives": collective_costs,
        "step_time_lower_bound_s": bound,
        "tokens_per_s_per_device": per_s,
    }


# the TPU compiler's refusal: "... memory required for HLO temporaries (21.79G) exceeds ..."
_REFUSED = re.compile(r"RESOURCE_EXHAUSTED.*?temporaries \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _compile(run: Abstract) -> Any:
    """The compiled train step of ``run``."""
    return run.steps.train.lower(run.state, run.frozen, run.batch).compile()


def policy(cfg: RunConfig) -> dict[str, Any]:
    """The choices of ``cfg`` a plan compares: mesh policies, dtypes, remat, micro-batches."""
    return {
        "base": cfg.mesh.base,
        "factors": cfg.mesh.factors,
        "param_dtype": cfg.model.param_dtype,
        "dtype": cfg.model.dtype,
        "remat": cfg.model.remat,
        "scan_layers": cfg.model.scan_layers,
        "grad_accum_steps": cfg.optim.grad_accum_steps,
        "batch_size": cfg.data.batch_size,
    }


def candidates(cfg: RunConfig, devices: int, num_kv_heads: int) -> Iterator[RunConfig]:
    """The variations of ``cfg`` that ``--search`` compiles: meshes (data = 1, tensor
    1, 2, 4 or 8 where it divides the devices and the KV heads, fsdp the rest), base and
    factor policies, remat "full" beside the config's, and the update's rows split into 2
    micro-batches beside 1 (same tokens per update)."""
    tensors = [t for t in (1, 2, 4, 8) if devices % t == 0 and num_kv_heads % t == 0]
    bases = ("fsdp", "tensor", "replicated")
    factor_policies = ("inherit", "replicated") if cfg.method == "lora" else ("inherit",)
    remats = dict.fromkeys((cfg.model.remat, "full"))
    rows = cfg.data.batch_size * cfg.optim.grad_accum_steps
    for t in tensors:
        for base in bases:
            if base == "tensor" and t == 1:
                continue  # the same shardings as "replicated" without a tensor axis
            for factors in factor_policies:
                for remat in remats:
                    for micro in (1, 2):
                        if rows % micro or (rows // micro) % (devices // t):
                            continue
                        yield dataclasses.replace(
                            cfg,
                            mesh=dataclasses.replace(
                                cfg.mesh,
                                data=1,
                                fsdp=devices // t,
                                tensor=t,
                                base=base,
                                factors=factors,
                            ),
                            model=dataclasses.replace(cfg.model, remat=remat),
                            data=dataclasses.replace(cfg.data, batch_size=rows // micro),
                            optim=dataclasses.replace(cfg.optim, grad_accum_steps=micro),
                        )


def search(cfg: RunConfig, target: Target) -> list[dict[str, Any]]:
    """Plans of every candidate; those that fit first, ranked by the step-time bound (by
    total bytes on CPU targets, which have no published peak)."""
    model, _ = models.abstract_load(cfg.model.name, **method_lib.model_options(cfg))
    plans = [
        plan(c, target) for c in candidates(cfg, len(target.devices), model.config.num_kv_heads)
    ]

    def rank(p: dict[str, Any]) -> tuple:
        bound = p["step_time_lower_bound_s"]
        return (not p["fits"], bound if bound is not None else 0.0, p["per_device"]["total"])

    return sorted(plans, key=rank)


def full_fine_tuning(cfg: RunConfig) -> RunConfig:
    """``cfg`` as full fine-tuning (the baseline a LoRA or BitFit plan is shown beside):
    the keys that only a frozen base or LoRA takes (several adapters, their rates, a
    quantized base, LoRA+) at their defaults."""
    defaults = RunConfig()
    return dataclasses.replace(
        cfg,
        method="full",
        lora=defaults.lora,
        model=dataclasses.replace(cfg.model, quantize=defaults.model.quantize),
        optim=dataclasses.replace(
            cfg.optim,
            learning_rates=defaults.optim.learning_rates,
            loraplus_lr_ratio=defaults.optim.loraplus_lr_ratio,
        ),
    )


def table(plans: Sequence[dict[str, Any]]) -> str:
    """A markdown table of ``plans``, one row each."""
    head = (
        "| method | mesh (data, fsdp, tensor) | base / factors | remat | micro | arguments GiB "
        "| temp GiB | total GiB | capacity GiB | fits | compiled TFLOP | model TFLOP "
        "| step ≥ s | tokens/s/chip @40% |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in plans:
        d, pol = p["per_device"], p["policy"]
        mesh = p["mesh"]
        per_s = p["tokens_per_s_per_device"]
        bound = p["step_time_lower_bound_s"]
        rows.append(
            f"| {p['method']} | {mesh['data']}, {mesh['fsdp']}, {mesh['tensor']} "
            f"| {pol['base']} / {pol['factors'] if p['method'] == 'lora' else '-'} "
            f"| {pol['remat']} | {pol['grad_accum_steps']} "
            f"| {d['arguments'] / GiB:.2f} | {d['temp'] / GiB:.2f} | {d['total'] / GiB:.2f} "
            f"| {d['capacity'] / GiB:.1f} | {'yes' if p['fits'] else 'no'} "
            f"| {_tera(p['compiled_flops'])} | {_tera(p['model_flops'])} "
            f"| {f'{bound:.3f}' if bound is not None else '-'} "
            f"| {f'{per_s[MFU_40]:,.0f}' if per_s else '-'} |"
        )
    return "\n".join(rows)


def _tera(flops: float | None) -> str:
    return "-" if flops is None else f"{flops / 1e12:.1f}"


def collective_lines(p: dict[str, Any]) -> str:
    """One line: the collectives of a plan's step, count and GiB per device."""
    parts = [
        f"{kind} ×{c['count']} ({c['bytes'] / GiB:.2f} GiB)"
        for kind, c in sorted((p["collectives"] or {}).items())
    ]
    return f"{p['method']}: " + (", ".join(parts) if parts else "none")


def run_command(args: argparse.Namespace) -> int:
    """``lora-jax plan``: prints the table (and collectives); ``--json`` writes the plans."""
    if (args.topology is None) == (args.devices is None):
        raise ConfigError("give the target: --topology NAME (e.g. v5e:16x16) or --devices N")
    target = tpu_target(args.topology) if args.topology else cpu_target(args.devices)
    cfg = load_config(args.config, args.overrides)
    if args.json:
        _check_output(Path(args.json))
    print(f"plan: {cfg.model.name}, {cfg.method}, on {target.name} ({len(target.devices)} devices)")
    main = plan(cfg, target)
    shown = [main]
    if cfg.method != "full":
        shown.append(plan(full_fine_tuning(cfg), target))
    result = dict(main)
    if len(shown) > 1:
        result["full_fine_tuning"] = shown[1]
    if args.search:
        found = search(cfg, target)
        result["search"] = found
        shown += found
    print(table(shown))
    for p in shown[:2]:
        print("collectives per step per device, " + collective_lines(p))
        if p.get("pallas_kernels"):
            print(
                f"{p['method']}: the compiled TFLOP leave out {p['pallas_kernels']} Pallas "
                f"kernel(s) (splash attention; the compiler cannot count inside them), so the "
                f"step bound is low by their FLOPs"
            )
    if target.chip is not None:
        print(
            f"{target.chip.name}: {target.chip.hbm_bytes / GiB:.0f} GiB HBM, "
            f"{target.chip.peak_flops / 1e12:.0f} TFLOP/s bf16 per chip ({target.chip.source})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"plan: {args.json}")
    return 0


def _check_output(path: Path) -> None:
    """``--json`` writes a new file only: never over one this command did not make."""
    if path.exists():
        raise ConfigError(f"--json {path}: the file exists; give a new path or remove it")
    if not path.parent.is_dir():
        raise ConfigError(f"--json {path}: the directory {path.parent} does not exist")
