"""The pipeline's LoRA variants: ``model.quantize`` (the adapted kernels stored quantized,
frozen, replicated), ``lora.use_dora``, ``lora.init`` pissa/olora and
``optim.loraplus_lr_ratio`` as config keys, each refused in one line where it does not
apply."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import lora_jax as lj
import models
from train import mesh as mesh_lib
from train.config import ConfigError, LoraSection, MeshConfig, load_config
from train.method import prepare, prepared_shapes

TARGETS = (".*/(q_proj|v_proj)/kernel", "embed_tokens/embedding")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["method=full", "model.quantize=nf4"],
            "model.quantize applies to LoRA's frozen base and factors, but method=full has none",
        ),
        (
            ["method=bitfit", "optim.loraplus_lr_ratio=16"],
            "optim.loraplus_lr_ratio applies to LoRA's frozen base and factors, but "
            "method=bitfit has none",
        ),
        (
            ["lora.use_dora=true", "lora.num_adapters=2"],
            "lora.use_dora=true is not supported with lora.num_adapters=2",
        ),
        (
            ["lora.init=pissa", "lora.num_adapters=2"],
            "lora.init=pissa is not supported with lora.num_adapters=2",
        ),
        (["optim.loraplus_lr_ratio=0"], "'optim.loraplus_lr_ratio' must be > 0.0"),
        (["model.quantize=nf8"], "expected one of ['none', 'int8', 'nf4']"),
    ],
)
def test_a_variant_where_it_does_not_apply_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["data.path=/x.csv", *overrides])
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_variant_keys_reach_lora_config():
    cfg = load_config(
        None,
        ["data.path=/x.csv", "lora.use_dora=true", "lora.init=olora", "model.quantize=int8"],
    )
    assert cfg.lora.use_dora and cfg.lora.init == "olora" and cfg.model.quantize == "int8"


@pytest.fixture(scope="module")
def tiny():
    """The tiny Llama preset with random float32 weights (numpy draws them)."""
    model, shapes = models.abstract_load("tiny-llama")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape).astype(s.dtype), shapes)
    return model, params


def test_quantize_stores_the_adapted_kernels_quantized_and_frozen(tiny):
    model, params = tiny
    lora = LoraSection(rank=4, targets=TARGETS)
    prepared, mask = jax.jit(lambda p, k: prepare("lora", p, lora, k, "nf4"))(
        params, jax.random.key(0)
    )
    flat, flat_mask = lj.flatten_paths(prepared), lj.flatten_paths(mask)
    adapted = [p.removesuffix("_lora_a") for p in flat if p.endswith("_lora_a")]
    kernels = [p for p in adapted if p.endswith("kernel")]
    assert kernels and "embed_tokens/embedding" in adapted
    for kernel in kernels:
        assert isinstance(flat[kernel], lj.QuantizedArray) and flat[kernel].fmt == "nf4"
        assert not flat_mask[kernel]  # frozen: no gradient, no optimizer state
    # An adapted embedding stays a plain table (its rows are looked up, not multiplied).
    assert not isinstance(flat["embed_tokens/embedding"], lj.QuantizedArray)
    others = [p for p, x in flat.items() if p.endswith("kernel") and p + "_lora_a" not in flat]
    assert others and not any(isinstance(flat[p], lj.QuantizedArray) for p in others)
    trainable = lj.flatten_paths(lj.split(prepared, mask)[1])
    assert all(p.endswith(("_lora_a", "_lora_b")) for p in trainable)
    # The abstract tree a run compiles for is the one prepare makes.
    shapes, _ = prepared_shapes("lora", params, lora, "nf4")
    assert jax.tree.structure(shapes) == jax.tree.structure(prepared)

    # Shardings match the tree leaf for leaf; a quantized kernel's buffers are replicated.
    mesh = mesh_lib.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    shardings = mesh_lib.param_shardings(models.logical_axes(model), shapes, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(prepared)
    quantized = lj.flatten_paths(shardings)[kernels[0]]
    assert all(s.spec == jax.sharding.PartitionSpec() for s in jax.tree.leaves(quantized))
