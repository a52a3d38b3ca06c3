"""lj.partition_specs on 8 CPU devices: factors are sharded as stated, outputs unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj

import tolerances as tol
from flax_fixtures import ScannedLM, init_variables, perturb_factors

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason=f"needs 8 (virtual) devices, has {jax.device_count()}: leave the device count in "
    "XLA_FLAGS to conftest.py",
)


def _scanned():
    model, ids = ScannedLM(vocab=56, dim=24, layers=2), (jnp.arange(16).reshape(2, 8) * 3) % 56
    params = init_variables(model, ids)["params"]
    cfg = lj.LoraConfig(
        4, 8, r"layers/(q_proj|v_proj|up_proj|down_proj)/kernel|embed_tokens/embedding"
    )
    return (
        model,
        ids,
        params,
        perturb_factors(lj.init(jax.random.key(1), params, cfg), jax.random.key(2)),
    )


def _base_specs(params):
    """Megatron-style: columns of q/v/up over 'tensor', rows of down over it, 'fsdp' on the rest."""

    def spec(path, w):
        name = jax.tree_util.keystr(path)
        lead = (None,) * (w.ndim - 2)  # the scanned layer axis stays whole
        if "down_proj" in name:
            return P(*lead, "tensor", "fsdp")
        if "embedding" in name:
            return P("tensor", "fsdp")
        if w.ndim >= 2:
            return P(*lead, "fsdp", "tensor")
        return P(*(None,) * w.ndim)

    return jax.tree_util.tree_map_with_path(spec, params)


def test_specs_follow_the_kernel_axes():
    _, _, params, adapted = _scanned()
    specs = lj.partition_specs(_base_specs(params), adapted)
    layers = specs["layers"]
    assert layers["q_proj"]["kernel_lora_a"] == P(None, "fsdp", None)
    assert layers["q_proj"]["kernel_lora_b"] == P(None, None, "tensor")
    assert layers["q_proj"]["kernel_lora_scale"] == P(None)
    assert layers["down_proj"]["kernel_lora_a"] == P(None, "tensor", None)
    assert layers["down_proj"]["kernel_lora_b"] == P(None, None, "fsdp")
    assert specs["embed_tokens"]["embedding_lora_a"] == P("tensor", None)
    assert specs["embed_tokens"]["embedding_lora_b"] == P(None, "fsdp")


def test_a_dora_magnitude_follows_the_output_axes():
    """DoRA's m holds one value per output column (stacked layers first): the kernel's
    output spec, like B's."""
    stacked = {"layers": {"kernel": jnp.zeros((3, 8, 16))}}
    config = lj.LoraConfig(2, 4, "kernel", use_dora=True)
    adapted = lj.init(jax.random.key(0), stacked, config)
    specs = lj.partition_specs({"layers": {"kernel": P(None, "fsdp", "tensor")}}, adapted)
    assert adapted["layers"]["kernel_lora_magnitude"].shape == (3, 16)
    assert specs["layers"]["kernel_lora_magnitude"] == P(None, "tensor")


def test_logical_axis_names_map_the_same_way():
    kernel = {"d": {"kernel": jnp.zeros((8, 16))}}
    adapted = lj.init(jax.random.key(0), kernel, lj.LoraConfig(2, 4, "d/kernel"))
    specs = lj.partition_specs({"d": {"kernel": ("embed", "mlp")}}, adapted)
    assert specs["d"] == {
        "kernel": ("embed", "mlp"),
        "kernel_lora_a": ("embed", None),
        "kernel_lora_b": (None, "mlp"),
        "kernel_lora_scale": (),
    }
    rules = (("embed", "fsdp"), ("mlp", "tensor"))
    assert nn.logical_to_mesh_axes(specs["d"]["kernel_lora_b"], rules) == P(None, "tensor")


def test_sharded_factored_forward_matches_one_device():
    model, ids, params, adapted = _scanned()
    expected = lj.apply(model.apply)({"params": adapted}, ids)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), lj.partition_specs(_base_specs(params), adapted)
    )
    placed = jax.device_put(adapted, shardings)
    batch = NamedSharding(mesh, P("data", None))
    forward = jax.jit(
        lambda p, x: lj.apply(model.apply)({"params": p}, x),
        in_shardings=(shardings, batch),
        out_shardings=NamedSharding(mesh, P("data")),
    )
    out = forward(placed, jax.device_put(ids, batch))
    # Sharded reductions add partial sums in another order: the model's chain of tolerances.py.
    n = tol.decoder_depth(layers=2, hidden=24, mlp=40, head_dim=6, keys=8, rank=4)
    tol.assert_close(out, expected, tol.chain_atol(n, tol.scale_of(expected)))
    a = placed["layers"]["q_proj"]["kernel_lora_a"]  # (layers 2, in 24, r 4) over fsdp=2
    assert a.sharding.spec == P(None, "fsdp", None)
    assert {s.data.shape for s in a.addressable_shards} == {(2, 12, 4)}
    b = placed["layers"]["q_proj"]["kernel_lora_b"]  # (2, 4, out 24) over tensor=2
    assert {s.data.shape for s in b.addressable_shards} == {(2, 4, 12)}
    assert len(out.sharding.device_set) == 8
