"""train/plan.py (``lora-jax plan``): the compiled step's costs, checked against closed
forms, the specs, and the same step when it runs; the TPU compiler on a v5e:2x2 slice."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from train import cli
from train import mesh as mesh_lib
from train import plan as plan_lib
from train.config import load_config
from train.mesh import put_batch
from train.setup import setup

import train_fixtures as tf

pytestmark = [
    pytest.mark.usefixtures("jax_compilation_cache"),
    pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 CPU devices of conftest.py"),
]
FSDP_8 = ("mesh.data=1", "mesh.fsdp=8")


def test_hlo_costs_weigh_loop_bodies_by_their_trip_count():
    """A scanned chain of K matmuls [M, N] @ [N, N] has 2·M·N·N·K FLOPs (XLA's own
    cost_analysis counts the loop body once), and a psum inside a K-step loop is K
    all-reduces of its operand's bytes."""
    m, n, k = 8, 16, 5
    w_KxNxN = jnp.ones((k, n, n))

    def chain(x_MxN, w_KxNxN):
        return jax.lax.scan(lambda x, w: (x @ w, None), x_MxN, w_KxNxN)[0]

    compiled = jax.jit(chain).lower(jnp.ones((m, n)), w_KxNxN).compile()
    flops, _ = plan_lib.hlo_costs(compiled.as_text())
    assert flops == 2 * m * n * n * k

    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))

    def summed(x_8xN):
        def body(_, x):
            return jax.lax.psum(x, "x") * 0.5

        inner = jax.shard_map(
            lambda x: jax.lax.fori_loop(0, k, body, x),
            mesh=mesh,
            in_specs=P("x"),
            out_specs=P("x"),
            check_vma=False,
        )
        return inner(x_8xN)

    x = jax.ShapeDtypeStruct((8, n), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    _, collectives = plan_lib.hlo_costs(jax.jit(summed).lower(x).compile().as_text())
    assert collectives["all-reduce"] == {"count": k, "bytes": k * n * 4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return tf.tiny_config(
        tf.write_tiny_llama(root / "model"), tf.write_csv(root / "e2e.csv"), root / "run", *FSDP_8
    )


@pytest.mark.parametrize("adapters", [1, 2])
def test_cpu_plan_predicts_the_running_step(tiny, adapters):
    """The plan of the tiny run on 8 CPU devices, made from shapes alone, against the run
    itself: its arguments are exactly the bytes device 0 holds of the run's train state,
    frozen half and batch, and its total is within ±15% of the run's (those arrays plus
    XLA's temporaries and outputs for the executable the run compiled). Also for two
    adapters trained together (train/bank.py: a state per adapter)."""
    tiny = dataclasses.replace(tiny, lora=dataclasses.replace(tiny.lora, num_adapters=adapters))
    planned = plan_lib.plan(tiny, plan_lib.cpu_target(8))
    s = setup(tiny, **tf.QUIET)
    batch = put_batch({k: v[None] for k, v in next(s.stream()).items()}, s.mesh)
    device = s.mesh.devices.flat[0]
    held = sum(
        shard.data.nbytes
        for x in jax.tree.leaves((s.state, s.frozen, batch))
        for shard in x.addressable_shards
        if shard.device == device
    )
    memory = s.step_fn.lower(s.state, s.frozen, batch).compile().memory_analysis()
    measured = (
        held + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes
    )
    d = planned["per_device"]
    assert held == d["frozen"] + d["state"] + d["batch"]
    if adapters == 1:
        assert d["arguments"] == held
    else:  # jit drops arguments the vmapped step never reads (a few bytes of counters)
        assert held - 64 <= d["arguments"] <= held
    assert abs(d["total"] - measured) <= 0.15 * measured
    for key in ("topology", "devices", "method", "fits", "compiled_flops", "model_flops"):
        assert key in planned
    assert planned["devices"] == 8 and planned["fits"]


def test_model_flops_formula(tiny):
    """LoRA's model FLOPs are 4·P + 3·a + 6·F per token and full fine-tuning's 6·P + 3·a
    (plan_lib.model_flops): their difference is 2·P - 6·F per token, with P and F counted
    here from the tiny Llama's shapes."""
    mesh = plan_lib.target_mesh(tiny, plan_lib.cpu_target(8))
    run = plan_lib.abstract_run(tiny, mesh)
    h, kv, d, mlp, v = (
        tf.HEADS * tf.HEAD_DIM,
        tf.KV_HEADS * tf.HEAD_DIM,
        tf.HIDDEN,
        tf.MLP,
        tf.VOCAB,
    )
    p = tf.LAYERS * (d * h + 2 * d * kv + h * d + 3 * d * mlp) + d * v
    f = tf.LAYERS * 4 * (d + h + d + kv)  # rank 4 on q_proj (d -> h) and v_proj (d -> kv)
    tokens = tiny.data.batch_size * tiny.data.max_length
    lora = plan_lib.model_flops(tiny, run.model, run.params, "lora")
    full = plan_lib.model_flops(tiny, run.model, run.params, "full")
    assert full - lora == (2 * p - 6 * f) * tokens


@pytest.mark.parametrize("method", ["lora", "full"])
def test_replicated_base_holds_fsdp_times_the_bytes(tiny, method):
    """mesh.base=replicated keeps a whole base on every device: per device exactly fsdp (8)
    times the base bytes of mesh.base=fsdp (every weight of the tiny Llama has an embed
    axis that 8 divides). The base is the frozen half for LoRA, the trained params for
    full fine-tuning (that the compiled step takes exactly the bytes the specs say is
    test_cpu_plan_predicts_the_running_step's)."""
    target = plan_lib.cpu_target(8)
    base_bytes = []
    for policy in ("fsdp", "replicated"):
        cfg = tf.tiny_config(
            tiny.model.name,
            tiny.data.path,
            tiny.output_dir,
            *FSDP_8,
            f"method={method}",
            f"mesh.base={policy}",
        )
        run = plan_lib.abstract_run(cfg, plan_lib.target_mesh(cfg, target))
        held = lj.flatten_paths(run.frozen if method == "lora" else run.state["params"])
        added = lj.flatten_paths(lj.adapter(run.params)) if method == "lora" else {}
        base_bytes.append(plan_lib.shard_bytes([x for p, x in held.items() if p not in added]))
    assert base_bytes[1] == 8 * base_bytes[0]


def test_factor_policy_replicates_only_the_factors():
    mesh = mesh_lib.make_mesh(tf.tiny_config("m", "d.csv", "o", *FSDP_8).mesh)
    names = {"layer": {"kernel": ("embed", "heads")}}
    params = {
        "layer": {
            "kernel": jax.ShapeDtypeStruct((16, 8), jnp.float32),
            "kernel_lora_a": jax.ShapeDtypeStruct((16, 2), jnp.float32),
            "kernel_lora_b": jax.ShapeDtypeStruct((2, 8), jnp.float32),
            "kernel_lora_scale": jax.ShapeDtypeStruct((), jnp.float32),
        }
    }
    inherit = mesh_lib.param_shardings(names, params, mesh)["layer"]
    replicated = mesh_lib.param_shardings(names, params, mesh, factors="replicated")["layer"]
    assert inherit["kernel"].spec == replicated["kernel"].spec == P("fsdp", "tensor")
    assert inherit["kernel_lora_a"].spec == P("fsdp", None)
    assert inherit["kernel_lora_b"].spec == P(None, "tensor")
    assert replicated["kernel_lora_a"].spec == replicated["kernel_lora_b"].spec == P(None, None)
    tensor = mesh_lib.param_shardings(names, params, mesh, base="tensor")["layer"]
    assert tensor["kernel"].spec == P(None, "tensor")  # no embed sharding


def _tile_padded_bytes(hlo: str) -> int:
    """Bytes of the ENTRY parameters of TPU ``hlo`` as laid out: each array's most minor
    dims (its layout's ``{minor_to_major}``) padded to the layout's first tile."""
    entry = hlo[hlo.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    total = 0
    for dtype, dims, layout in re.findall(r"= (\w+)\[([\d,]*)\]\{([^}]*)\} parameter\(", entry):
        shape = [int(x) for x in dims.split(",") if x]
        order, _, tiles = layout.partition(":")
        minor_to_major = [int(x) for x in order.split(",") if x]
        physical = [shape[i] for i in reversed(minor_to_major)]
        tile = re.match(r"T\(([\d,]+)\)", tiles)
        if tile:
            sizes = [int(x) for x in tile.group(1).split(",")]
            for i, t in enumerate(reversed(sizes), start=1):
                if i <= len(physical):
                    physical[-i] = -(-physical[-i] // t) * t
                else:
                    physical.insert(0, t)  # a scalar still takes a whole tile
        itemsize = 2 if dtype == "bf16" else 1 if dtype == "pred" else int(dtype[1:]) // 8
        total += math.prod(physical) * itemsize
    return total


# The second compile of the same TPU step finds the first in the tests' persistent
# compilation cache, which cannot load an executable for devices it has no client for.
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")
def test_tpu_plan_on_v5e_2x2(tmp_path, capsys):
    """`lora-jax plan` with the TPU compiler (libtpu) for a 4-chip v5e slice: the JSON
    holds every field; per chip, the arguments are the spec-derived shard bytes padded to
    the TPU's tiles as the compiled layouts give them, and the plan reports v5e's 16 GiB."""
    out = tmp_path / "plan.json"
    argv = [
        "plan",
        str(tf.REPO_ROOT / "configs/e2e_lora.yaml"),
        "--topology",
        "v5e:2x2",
        "model.name=tiny-llama",
        "model.dtype=bfloat16",
        "data.max_length=64",
        "mesh.data=1",
        "mesh.fsdp=-1",
        "--json",
        str(out),
    ]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    for key in (
        "topology",
        "devices",
        "method",
        "per_device",
        "fits",
        "compiled_flops",
        "model_flops",
        "collectives",
        "step_time_lower_bound_s",
    ):
        assert key in result and key in result["full_fine_tuning"]
    assert result["topology"] == "v5e:2x2" and result["devices"] == 4
    d = result["per_device"]
    assert d["capacity"] == 16 * 2**30 and result["fits"]
    assert d["arguments"] >= d["frozen"] + d["state"] + d["batch"]
    assert result["step_time_lower_bound_s"] > 0
    assert "| lora | 1, 4, 1 |" in capsys.readouterr().out

    cfg = load_config(
        tf.REPO_ROOT / "configs/e2e_lora.yaml",
        [a for a in argv if "=" in a and not a.startswith("-")],
    )
    target = plan_lib.tpu_target("v5e:2x2")
    run = plan_lib.abstract_run(plan_lib.method_lib.resolve(cfg), plan_lib.target_mesh(cfg, target))
    compiled = plan_lib._compile(run)
    assert compiled.memory_analysis().argument_size_in_bytes == _tile_padded_bytes(
        compiled.as_text()
    )


def test_plan_refuses_bad_targets_in_one_line(tmp_path, capsys):
    config = str(tf.REPO_ROOT / "configs/e2e_lora.yaml")
    message = tf.refused(["plan", config, "--topology", "v9z:1x1"], capsys)
    assert "v5e:16x16" in message
    existing = tmp_path / "taken.json"
    existing.write_text("{}")
    message = tf.refused(["plan", config, "--devices", "8", "--json", str(existing)], capsys)
    assert "exists" in message and existing.read_text() == "{}"


def test_search_candidates_keep_the_tokens_of_an_update(tiny):
    """--search varies mesh, policies, remat and micro-batches, never the tokens of an
    update; every mesh uses all devices and every micro-batch splits over them."""
    found = list(plan_lib.candidates(tiny, 8, num_kv_heads=tf.KV_HEADS))
    rows = tiny.data.batch_size * tiny.optim.grad_accum_steps
    assert found and len({str(c) for c in found}) == len(found)
    for c in found:
        assert c.data.batch_size * c.optim.grad_accum_steps == rows
        assert c.mesh.data * c.mesh.fsdp * c.mesh.tensor == 8
        assert c.data.batch_size % (c.mesh.data * c.mesh.fsdp) == 0
        assert tf.KV_HEADS % c.mesh.tensor == 0
    assert {c.mesh.base for c in found} == {"fsdp", "tensor", "replicated"}
    assert {c.mesh.factors for c in found} == {"inherit", "replicated"}
    assert {c.model.remat for c in found} == {tiny.model.remat, "full"}


@pytest.mark.parametrize(
    ("name", "method", "stored"),
    [
        ("llama-3.2-1b", "lora", "bfloat16"),  # 1.24B parameters, frozen
        ("llama-3.2-1b", "full", "float32"),  # trained: float32 master weights
        ("tiny-llama", "lora", "float32"),  # below 1B
    ],
)
def test_auto_param_dtype(name, method, stored):
    cfg = load_config(None, [f"model.name={name}", f"method={method}"])
    assert cfg.model.param_dtype == "auto"
    assert plan_lib.method_lib.resolve(cfg).model.param_dtype == stored
