"""train/mesh.py + train/run.py setup: the same run on a 1-device mesh and on a
(data=2, fsdp=2, tensor=2) mesh of 8 CPU devices (conftest.py forces 8)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from train import mesh as mesh_lib
from train.config import ConfigError, MeshConfig
from train.mesh import put_batch
from train.setup import setup

import tolerances as tol
import train_fixtures as tf

STEPS = 4
MESH_8 = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
# tiny_config's run: the tiny Llama over 40 keys with rank-4 LoRA, 8 rows of 40 tokens.
FORWARD = tol.decoder_depth(
    layers=tf.LAYERS, hidden=tf.HIDDEN, mlp=tf.MLP, head_dim=tf.HEAD_DIM, keys=40, rank=4
)


def run_atol(updates, scale):
    """Two runs that differ in the order of float32 reductions only: the chain of a loss or
    parameter after `updates` updates (tolerances.train_depth)."""
    return tol.chain_atol(tol.train_depth(FORWARD, tf.VOCAB, 8 * 40, updates), scale)


pytestmark = pytest.mark.usefixtures("jax_compilation_cache")
needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8,
    reason=f"needs 8 (virtual) devices, has {jax.device_count()}: leave the device count in "
    "XLA_FLAGS to conftest.py",
)


def trajectory(s, steps=STEPS):
    """Losses of the first ``steps`` updates, and the final state."""
    state, stream, losses = s.state, s.stream(), []
    for _ in range(steps):
        batch = {k: v[None] for k, v in next(stream).items()}
        state, metrics = s.step_fn(state, s.frozen, put_batch(batch, s.mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


@needs_8_devices
@pytest.mark.parametrize("method", ["lora", "full"])
def test_sharded_mesh_matches_one_device(run_files, method):
    model_dir, csv, root = run_files
    runs = {}
    for name, mesh in (("one", ("mesh.data=1",)), ("eight", MESH_8)):
        cfg = tf.tiny_config(model_dir, csv, root / name, f"method={method}", *mesh)
        runs[name] = trajectory(setup(cfg, log=lambda _: None))
    (one, state_one), (eight, state_eight) = runs["one"], runs["eight"]
    assert one[-1] < one[0]  # it trains
    # Only the order of float32 reductions differs between the two meshes; loss k comes
    # after k updates.
    for k, (a, b) in enumerate(zip(eight, one, strict=True)):
        tol.assert_close(a, b, run_atol(k, b), f"loss {k}")
    tol.tree_assert_close(
        state_eight["params"], state_one["params"], lambda p: run_atol(STEPS, tol.scale_of(p))
    )


@needs_8_devices
def test_params_factors_and_moments_are_sharded_as_specified(run_files):
    model_dir, csv, root = run_files
    s = setup(
        tf.tiny_config(
            model_dir,
            csv,
            root / "specs",
            *MESH_8,
            "lora.targets=[.*/(q_proj|v_proj|down_proj)/kernel]",
        ),
        log=lambda _: None,
    )
    layer = s.frozen["layers_0"]
    spec = lambda x: x.sharding.spec  # noqa: E731
    assert spec(s.frozen["embed_tokens"]["embedding"]) == P("tensor", "fsdp")  # (vocab, embed)
    assert spec(layer["self_attn"]["q_proj"]["kernel"]) == P("fsdp", "tensor")  # (embed, heads)
    assert spec(layer["mlp"]["down_proj"]["kernel"]) == P("tensor", "fsdp")  # (mlp, embed)
    assert spec(layer["input_layernorm"]["scale"]) == P("fsdp")
    factors = s.state["params"]["layers_0"]
    # A follows the kernel's input axis, B its output axis, the rank is replicated.
    assert spec(factors["self_attn"]["q_proj"]["kernel_lora_a"]) == P("fsdp", None)
    assert spec(factors["self_attn"]["q_proj"]["kernel_lora_b"]) == P(None, "tensor")
    assert spec(factors["mlp"]["down_proj"]["kernel_lora_a"]) == P("tensor", None)
    assert spec(factors["mlp"]["down_proj"]["kernel_lora_b"]) == P(None, "fsdp")
    a = factors["self_attn"]["q_proj"]["kernel_lora_a"]  # (32, 4) over fsdp=2
    assert {shard.data.shape for shard in a.addressable_shards} == {(16, 4)}
    # Adam's moments are sharded like their parameter.
    adam = [x for x in jax.tree.leaves(s.state["opt_state"]) if x.shape == a.shape]
    assert adam and all(x.sharding.spec == P("fsdp", None) for x in adam)


@needs_8_devices
def test_spec_drops_axes_that_do_not_divide_or_repeat():
    mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh_lib.spec_for(("embed", "heads"), (32, 6), mesh) == P("fsdp", "tensor")
    assert mesh_lib.spec_for(("embed", "heads"), (33, 5), mesh) == P(None, None)
    assert mesh_lib.spec_for(("heads", "mlp"), (4, 4), mesh) == P("tensor", None)
    assert mesh_lib.spec_for(("layers", "embed", None), (2, 4, 4), mesh) == P(None, "fsdp", None)


@needs_8_devices
def test_mesh_sizes_fill_and_errors():
    assert mesh_lib.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=1), 8) == {
        "data": 4,
        "fsdp": 2,
        "tensor": 1,
    }
    assert mesh_lib.mesh_shape(MeshConfig(data=1, fsdp=1, tensor=1), 8) == {
        "data": 1,
        "fsdp": 1,
        "tensor": 1,
    }
    with pytest.raises(ConfigError, match="do not divide"):
        mesh_lib.mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)
    with pytest.raises(ConfigError, match="needs 16 devices"):
        mesh_lib.mesh_shape(MeshConfig(data=4, fsdp=4, tensor=1), 8)
    with pytest.raises(ConfigError, match="multiple of 4"):
        mesh_lib.check_batch_fits(6, mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
