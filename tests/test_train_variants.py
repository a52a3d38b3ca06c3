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
        (
            ["lora.init=olora", "lora.use_dora=true"],
            "lora.init=olora with lora.use_dora=true is not supported",
        ),
        (
            ["lora.init=pissa", "model.quantize=nf4"],
            "lora.init=pissa with model.quantize=nf4 is not supported",
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
    cfg = load_config(None, ["data.path=/x.csv", "lora.use_dora=true", "model.quantize=int8"])
    assert cfg.lora.use_dora and cfg.model.quantize == "int8"
    assert load_config(None, ["data.path=/x.csv", "lora.init=olora"]).lora.init == "olora"


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


def test_a_residual_init_run_saves_an_adapter_of_the_original_base(tmp_path):
    """PiSSA / OLoRA train on W_res = W − s·A₀·B₀; the run saves lj.convert_to_lora's rank-2r
    adapter of the original W. Read back onto the original base (what eval, merge and export
    do), it computes what the run trained: W_res + s·A·B, rebuilt from the run's initial
    tree (its key) and the trained A, B (the saved factors' first r columns / rows, whose
    rest must be exactly A₀ and −B₀). PiSSA's run; OLoRA's takes the same path
    (train/method.py ``for_original_base``), its factors tests/test_pissa.py's."""
    init = "pissa"
    from train.adapter import load_adapter
    from train.method import init_keys
    from train.run import train

    import tolerances as tol
    import train_fixtures as tf

    model_dir = tf.write_tiny_llama(tmp_path / "model")
    cfg = tf.tiny_config(
        model_dir,
        tf.write_csv(tmp_path / "d.csv"),
        tmp_path / "run",
        f"lora.init={init}",
        "lora.rank=2",
        "optim.max_steps=3",
        "optim.learning_rate=1e-2",
        "optim.warmup_steps=0",
    )
    train(cfg, **tf.QUIET)
    model, base, _ = models.load(model_dir, **dict(scan_layers=cfg.model.scan_layers))
    saved = load_adapter(tmp_path / "run" / "adapter", base)  # original W + rank-2r factors
    initial = prepare("lora", base, cfg.lora, init_keys(cfg))[0]  # W_res, A₀, B₀
    flat_saved, flat_initial = lj.flatten_paths(saved), lj.flatten_paths(initial)
    trained = dict(flat_initial)
    r = cfg.lora.rank
    for path in flat_initial:
        if path.endswith("_lora_a"):
            a2, b2 = flat_saved[path], flat_saved[path.replace("_lora_a", "_lora_b")]
            assert a2.shape[-1] == 2 * r
            np.testing.assert_array_equal(a2[..., r:], flat_initial[path])
            np.testing.assert_array_equal(
                b2[..., r:, :], -flat_initial[path.replace("_lora_a", "_lora_b")]
            )
            trained[path] = a2[..., :r]
            trained[path.replace("_lora_a", "_lora_b")] = b2[..., :r, :]
    trained = lj.unflatten_paths(trained)
    ids = np.arange(24).reshape(2, 12) % model.config.vocab_size
    on_original = lj.apply(model.apply)({"params": saved}, ids)
    as_trained = lj.apply(model.apply)({"params": trained}, ids)
    # both are W_res + s·A·B: W + s·A'·B' differs by the roundings of W − s·A₀·B₀ and of the
    # rank-2r sum, a few ulps of each weight, carried through the decoder like its own
    atol = tol.logits_atol(model.config, as_trained, keys=12, rank=2 * r)
    tol.assert_close(on_original, as_trained, atol, "logits")
    # the check can fail: the raw factors on the original base are another model
    raw = dict(flat_saved) | {p: v for p, v in lj.flatten_paths(trained).items() if "_lora_" in p}
    wrong = lj.apply(model.apply)({"params": lj.unflatten_paths(raw)}, ids)
    assert not tol.close(wrong, as_trained, atol)
