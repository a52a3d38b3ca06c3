"""PiSSA and OLoRA (`LoraConfig(init="pissa" | "olora")`): the residual base and the
principal factors against PEFT's ``init_lora_weights`` on the same weights, and
`lj.convert_to_lora`'s same-output property, in our forward and in PEFT's."""

from __future__ import annotations

import functools

import jax
import numpy as np
import peft
import pytest
import torch

import lora_jax as lj
import models
from lora_jax.peft import PeftFormatError
from models.hf_names import peft_module_map, tied_modules

import tolerances as tol
from test_peft import IDS, hf_model

RANK, ALPHA = 4, 8
MODULES = {"q_proj": "self_attn", "up_proj": "mlp"}
TARGETS = r"(q_proj|up_proj)/kernel"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    hf_model("llama").save_pretrained(directory)
    model, params, _ = models.load(directory)
    return model, params


@pytest.fixture(scope="module")
def initial(llama):
    """init -> our initial adapter of that init, factorised once (read by two tests) and
    jitted (eagerly every op compiles apart, seconds on a small CPU)."""
    _, base = llama
    init_jit = jax.jit(lj.init, static_argnums=2)
    config = lambda init: lj.LoraConfig(RANK, ALPHA, TARGETS, init=init)
    return functools.cache(lambda init: init_jit(jax.random.key(0), base, config(init)))


def _maps(model):
    return dict(module_map=peft_module_map(model.config), tied=tied_modules(model.config))


def _sensitivity(init: str, w: np.ndarray) -> float:
    """How much the rank-r part s·A·B of W (fan_in × fan_out) moves, relative to a backward
    error ‖E‖ of the factorisation: the first-order perturbation bounds (Wedin) of the
    truncated SVD, 1 + 2σ₁/(σ_r − σ_(r+1)), and of OLoRA's projection onto the span of Wᵀ's
    first r columns, 1 + 2σ₁/σ_min(those columns)."""
    sigma = np.linalg.svd(w, compute_uv=False)
    if init == "pissa":
        return 1 + 2 * sigma[0] / (sigma[RANK - 1] - sigma[RANK])
    first = np.linalg.svd(w.T[:, :RANK], compute_uv=False)
    return 1 + 2 * sigma[0] / first[-1]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_equals_peft(llama, initial, init):
    model, base = llama
    ours = initial(init)
    theirs = peft.get_peft_model(
        hf_model("llama"),
        peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=list(MODULES), init_lora_weights=init
        ),
    )
    s = ALPHA / RANK
    for name, block in MODULES.items():
        for layer in range(model.config.num_layers):
            module = theirs.base_model.model.model.layers[layer]
            torch_module = getattr(getattr(module, block), name)
            w_res = torch_module.base_layer.weight.detach().numpy().T.astype(np.float64)
            a_t = torch_module.lora_A["default"].weight.detach().numpy().astype(np.float64)
            b_t = torch_module.lora_B["default"].weight.detach().numpy().astype(np.float64)
            mine = ours[f"layers_{layer}"][block][name]
            w = np.asarray(base[f"layers_{layer}"][block][name]["kernel"], np.float64)
            # Householder SVD/QR are backward stable: each side factors W + E with
            # ‖E‖₂ <= γ_(fan_in·fan_out)·‖W‖₂ (Higham Thm 19.4); s·A·B moves by at most
            # `_sensitivity` times that, and so does W_res = W − s·A·B. Two sides.
            norm = np.linalg.norm(w, 2)
            atol = tol.chain_atol(w.size, norm * _sensitivity(init, w))
            product = s * np.asarray(mine["kernel_lora_a"]) @ np.asarray(mine["kernel_lora_b"])
            tol.assert_close(product, s * (b_t @ a_t).T, atol, f"{init} s·A·B {name} {layer}")
            tol.assert_close(mine["kernel"], w_res, atol, f"{init} W_res {name} {layer}")
            # The principal part is most of W: a real, not a vanishing, comparison.
            assert np.linalg.norm(product, 2) > 0.3 * norm


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_converted_adapter_gives_the_same_output_on_the_original_base(
    llama, initial, init, tmp_path
):
    model, base = llama
    initial = initial(init)
    rng = np.random.default_rng(0)  # numpy: an eager jax.random compiles once per shape
    trained = jax.tree_util.tree_map_with_path(  # a "trained" adapter: A and B moved
        lambda p, x: (
            x + 0.05 * rng.standard_normal(x.shape, np.float32)
            if str(p[-1].key).endswith(("_lora_a", "_lora_b"))
            else x
        ),
        initial,
    )
    with pytest.raises(PeftFormatError, match="residual base"):
        lj.to_peft(tmp_path / "plain", trained, init=init, **_maps(model))
    converted = lj.convert_to_lora(trained, initial)
    expected = np.asarray(lj.apply(model.apply)({"params": trained}, IDS))
    ours = np.asarray(lj.apply(model.apply)({"params": converted}, IDS))
    # The rank-2r chain of tolerances.py, plus the two bases' own roundings: W_res and
    # W = W_res + s·A₀·B₀ each round a rank-r product once more (rank 3r in all).
    atol = tol.logits_atol(model.config, expected, keys=IDS.shape[1], rank=3 * RANK)
    tol.assert_close(ours, expected, atol, "converted, ours")
    original = np.asarray(model.apply({"params": base}, IDS))
    assert not tol.close(original, expected, atol)  # the adapter does something

    directory = lj.to_peft(tmp_path / "converted", converted, **_maps(model))
    peft_model = peft.PeftModel.from_pretrained(hf_model("llama"), directory).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    tol.assert_close(theirs, expected, atol, "converted, in PEFT on the original base")
