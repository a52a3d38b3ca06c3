"""DoRA (`LoraConfig(use_dora=True)`): the column norm's thin-product expansion against the
direct formula, logits against PEFT's ``use_dora`` on the same weights (both directions
through PEFT's files), merge against the factored forward, and no fan_in × fan_out
temporary in the gradient's jaxpr."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import lora_jax as lj
import models
from lora_jax import _dora
from lora_jax._layout import Layout
from models.hf_names import peft_module_map, tied_modules

import tolerances as tol
from test_peft import IDS, hf_model

TARGETS = r"(q_proj|v_proj|up_proj|down_proj)/kernel"
RANK = 4


def test_the_expansion_equals_the_direct_column_norm():
    # W (stack 3, fan_in 2x8, fan_out 5): a stacked weight with two input axes. numpy draws
    # them: an eager jax.random.normal compiles once per shape, seconds each on a small CPU.
    rng = np.random.default_rng(0)
    w, a, b = (
        jnp.asarray(rng.standard_normal(shape, np.float32))
        for shape in [(3, 2, 8, 5), (3, 2, 8, RANK), (3, RANK, 5)]
    )
    s = jnp.array([0.5, 2.0, 1.0])
    got = _dora.adapted_norm(w, a, b, s, Layout(1, 2))

    w64, a64, b64, s64 = (np.asarray(x, np.float64) for x in (w, a, b, s))
    v = w64.reshape(3, 16, 5) + s64[:, None, None] * (a64.reshape(3, 16, RANK) @ b64)
    direct = np.sqrt((v**2).sum(axis=1))
    # n² = ‖w‖² + 2s·(WᵀA)·b + s²·bᵀ(AᵀA)b: reductions of 16 (fan_in), then r, then r, and
    # 4 roundings (the products by s, the two additions): γ_(16+2r+4) times the sum of the
    # terms' magnitudes T. Through the square root an error δ of n² moves n by δ/(2n), plus
    # the root's own rounding (a few ulps of n).
    abs_a, abs_b, abs_w = (
        np.abs(a64.reshape(3, 16, RANK)),
        np.abs(b64),
        np.abs(w64.reshape(3, 16, 5)),
    )
    sa = np.abs(s64)[:, None]
    terms = (
        (w64.reshape(3, 16, 5) ** 2).sum(1)
        + 2 * sa * np.einsum("sio,sir,sro->so", abs_w, abs_a, abs_b)
        + sa**2 * np.einsum("sro,sir,siq,sqo->so", abs_b, abs_a, abs_a, abs_b)
    )
    atol = tol.dot_error(terms / (2 * direct), 16 + 2 * RANK + 4) + tol.dot_error(
        direct, tol.ELEMENTWISE
    )
    tol.assert_close(got, direct, atol, "column norm")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(our model, base params, torch model) of a tiny random Llama, float32."""
    hf = hf_model("llama")
    directory = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(directory)
    model, params, _ = models.load(directory)
    return model, params, hf


@pytest.fixture(scope="module")
def dora(llama):
    """(DoRA params, their factored logits on IDS): shared by the tests that only read them."""
    model, base, _ = llama
    params = _dora_params(base)
    return params, np.asarray(lj.apply(model.apply)({"params": params}, IDS))


def _dora_params(base, seed=1):
    """A DoRA adapter that does something: A, B and m all moved off their init. `lj.init` runs
    jitted and the noise is numpy's: eagerly every op (each jax.random draw per leaf shape)
    compiles apart, seconds on a small CPU."""
    config = lj.LoraConfig(RANK, 8, TARGETS, use_dora=True)
    params = jax.jit(lj.init, static_argnums=2)(jax.random.key(0), base, config)
    rng = np.random.default_rng(seed)

    def bump(path, x):
        name = str(path[-1].key)
        if name.endswith(("_lora_a", "_lora_b")):
            return x + 0.1 * rng.standard_normal(x.shape, np.float32)
        if name.endswith("_lora_magnitude"):
            return x * (1 + 0.2 * rng.standard_normal(x.shape, np.float32))
        return x

    return jax.tree_util.tree_map_with_path(bump, params)


def _atol(model, expected):
    # The LoRA chain of tolerances.py with, per adapted projection, DoRA's column norm
    # (a reduction over hidden, then 2r; its square root) and the two products by g.
    cfg = model.config
    extra = cfg.hidden_size + 2 * RANK + 3 * tol.ELEMENTWISE
    return tol.logits_atol(cfg, expected, keys=IDS.shape[1], rank=RANK + extra)


def _torch_logits(module) -> np.ndarray:
    with torch.no_grad():
        return module(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy()


def _maps(model):
    return dict(module_map=peft_module_map(model.config), tied=tied_modules(model.config))


def test_our_dora_adapter_runs_in_peft_with_equal_logits(llama, dora, tmp_path):
    model, _, hf = llama
    params, ours = dora
    directory = lj.to_peft(tmp_path, params, **_maps(model))
    peft_model = peft.PeftModel.from_pretrained(hf, directory).eval()
    try:
        theirs = _torch_logits(peft_model)
    finally:
        peft_model.unload()
    plain = np.asarray(lj.apply(model.apply)({"params": _without_magnitudes(params)}, IDS))
    assert not tol.close(plain, theirs, _atol(model, theirs))  # the magnitudes matter
    tol.assert_close(ours, theirs, _atol(model, theirs), "DoRA logits vs PEFT")


def test_a_peft_dora_adapter_loads_with_equal_logits(llama, tmp_path):
    model, base, _ = llama
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(
        hf_model("llama"),
        peft.LoraConfig(
            r=RANK, lora_alpha=8, target_modules=["k_proj", "gate_proj"], use_dora=True
        ),
    ).eval()
    with torch.no_grad():  # move B and m off their init, so the adapter does something
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.mul_(1.1).add_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path)
    adapted = lj.from_peft(tmp_path, base, **_maps(model))
    theirs = _torch_logits(peft_model)
    ours = np.asarray(lj.apply(model.apply)({"params": adapted}, IDS))
    tol.assert_close(ours, theirs, _atol(model, theirs), "PEFT DoRA loaded")


def test_merge_equals_the_factored_forward(llama, dora):
    model, _, _ = llama
    params, factored = dora
    merged_params = jax.jit(lj.merge)(params)  # one compile; eagerly each op compiles apart
    merged = np.asarray(model.apply({"params": merged_params}, IDS))
    tol.assert_close(merged, factored, _atol(model, factored), "merged DoRA")
    with pytest.raises(ValueError, match="DoRA adapter cannot be unmerged"):
        lj.unmerge(merged_params, lj.adapter(params))


def _without_magnitudes(params):
    flat = {k: v for k, v in lj.flatten_paths(params).items() if "_lora_magnitude" not in k}
    return lj.unflatten_paths(flat)


def _largest_temporary(fn, *args) -> int:
    """The most elements of any value computed in `fn`'s jaxpr (inputs excluded), walking
    every sub-jaxpr (pjit, custom_vjp, scan, remat bodies)."""

    def walk(jaxpr):
        biggest = 0
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()))))
            for sub in jax.core.jaxprs_in_params(eqn.params):
                biggest = max(biggest, walk(sub))
        return biggest

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_the_gradient_forms_no_fan_in_by_fan_out_temporary(llama):
    # hidden 64, mlp 96: the smallest adapted kernel has 64·64 = 4096 elements, more than any
    # activation of 1x5 tokens (logits 5·96) or the RoPE/mask tables of 32 positions. Only
    # shapes matter to a jaxpr, so the params are ShapeDtypeStructs (nothing is initialised).
    config = models.with_options(
        llama[0].config, hidden_size=64, intermediate_size=96, num_heads=4, head_dim=16
    )
    model = models.Decoder(config)
    base = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
    dora_config = lj.LoraConfig(RANK, 8, TARGETS, use_dora=True)
    params = jax.eval_shape(lambda b: lj.init(jax.random.key(0), b, dora_config), base)
    frozen, trainable = lj.split(params)
    ids = IDS[:1, :5]

    def loss(forward, trainable, frozen):
        return jnp.sum(forward({"params": lj.combine(frozen, trainable)}, ids) ** 2)

    factored = lj.apply(model.apply)
    through_merge = lambda variables, x: model.apply({"params": lj.merge(variables["params"])}, x)
    smallest_kernel = 64 * 64
    grad = lambda forward: jax.grad(functools.partial(loss, forward))
    assert _largest_temporary(grad(factored), trainable, frozen) < smallest_kernel
    # The walk does see a formed W' (the check can fail): merging inside the loss forms it.
    assert _largest_temporary(grad(through_merge), trainable, frozen) >= smallest_kernel
