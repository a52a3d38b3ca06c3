"""lora_jax/peft.py: PEFT adapters both ways, checked against PEFT itself on tiny random
transformers GPT-2 and Llama models (torch CPU, float32), and its strict loading errors."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import lora_jax as lj
import models
from lora_jax.peft import HFModule, PeftFormatError, default_module_map
from models.hf_names import peft_module_map, tied_modules

import tolerances as tol

peft = pytest.importorskip("peft")

VOCAB = 96
IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 7)).astype(np.int32)
GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)


def hf_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random transformers GPT-2 or Llama (also used by test_hf_export)."""
    torch.manual_seed(seed)
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2, **overrides)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides})).eval()


_BASES: dict = {}


def _base(tmp_path_factory, family: str, scan: bool = False, **overrides):
    """(our model, base params, torch model) of one tiny random checkpoint (cached)."""
    key = (family, scan, tuple(sorted(overrides.items())))
    if key not in _BASES:
        hf = hf_model(family, **overrides)
        directory = tmp_path_factory.mktemp(family)
        hf.save_pretrained(directory)
        model, params, _ = models.load(directory, scan_layers=scan)
        _BASES[key] = model, params, hf
    return _BASES[key]


def _torch_logits(module) -> np.ndarray:
    with torch.no_grad():
        return module(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy()


def _our_logits(model, params) -> np.ndarray:
    return np.asarray(lj.apply(model.apply)({"params": params}, IDS))


def _atol(model, expected, rank: int) -> float:
    """Ours against torch (both float32): the decoder's chain of tolerances.py over the 7
    tokens of IDS, with a rank-`rank` adapter beside the projections."""
    return tol.logits_atol(model.config, expected, keys=IDS.shape[1], rank=rank)


def _nonzero(params, seed: int = 1):
    """Every LoRA factor plus noise, so that B is not zero and the adapter does something."""

    def bump(path, x):
        if str(path[-1].key).endswith(("_lora_a", "_lora_b")):
            return x + 0.1 * jax.random.normal(
                jax.random.fold_in(jax.random.key(seed), x.size), x.shape
            )
        return x

    return jax.tree_util.tree_map_with_path(bump, params)


def _maps(model):
    return dict(module_map=peft_module_map(model.config), tied=tied_modules(model.config))


EXPORTS = {
    # GPT-2: Conv1D (fan_in_fan_out), q and v fused into c_attn with different scales.
    "gpt2": (
        dict(family="gpt2"),
        lj.LoraConfig(
            4,
            8,
            r"(q_proj|v_proj|up_proj)/kernel",
            rank_pattern={"up_proj": 2},
            alpha_pattern={"v_proj": 12},
        ),
    ),
    # Scanned, tied Llama: embedding adapter (ensure_weight_tying), rsLoRA, rank pattern.
    "llama-scan-tied": (
        dict(family="llama", scan=True, tie_word_embeddings=True),
        lj.LoraConfig(
            4,
            8,
            r"(q_proj|v_proj|down_proj)/kernel|embed_tokens",
            use_rslora=True,
            rank_pattern={"down_proj": 3},
        ),
    ),
    "llama": (
        dict(family="llama"),
        lj.LoraConfig(2, 5, r"(k_proj|o_proj|gate_proj)/kernel|lm_head", init="kaiming_uniform"),
    ),
}


@pytest.fixture(scope="module", params=sorted(EXPORTS))
def exported(request, tmp_path_factory):
    """(name, our model, adapted params, torch model, PEFT directory)."""
    base_args, config = EXPORTS[request.param]
    model, base, hf = _base(tmp_path_factory, **base_args)
    params = _nonzero(lj.init(jax.random.key(0), base, config))
    directory = lj.to_peft(
        tmp_path_factory.mktemp("peft"), params, use_rslora=config.use_rslora, **_maps(model)
    )
    return request.param, model, params, hf, directory


def test_our_adapter_runs_in_peft_with_equal_logits(exported):
    name, model, params, hf, directory = exported
    with warnings.catch_warnings():  # PEFT only warns about missing or unexpected keys
        warnings.filterwarnings("error", message=r"(?i).*(missing|unexpected).*keys")
        peft_model = peft.PeftModel.from_pretrained(hf, directory).eval()
    try:
        theirs = _torch_logits(peft_model)
        rank = EXPORTS[name][1].rank
        tol.assert_close(_our_logits(model, params), theirs, _atol(model, theirs, rank))
    finally:
        peft_model.unload()  # the cached torch model stays the base


def test_the_files_are_as_peft_writes_them(exported):
    name, model, params, _, directory = exported
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(directory / "adapter_model.safetensors")
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    if name == "gpt2":
        assert config["fan_in_fan_out"] and sorted(config["target_modules"]) == ["c_attn", "c_fc"]
        assert (config["r"], config["lora_alpha"]) == (8, 16)  # c_attn: q and v at rank 4 each
        assert config["rank_pattern"] == {"c_fc": 2} and config["alpha_pattern"] == {"c_fc": 8}
        assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (
            8,
            32,
        )
        b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
        assert b.shape == (96, 8) and not b[32:64].any()  # no k block
        assert not b[:32, 4:].any() and not b[64:, :4].any()  # q and v use their own columns
    if name == "llama-scan-tied":
        assert config["use_rslora"] and config["ensure_weight_tying"]
        assert config["lora_alpha"] == 8 and config["rank_pattern"] == {"down_proj": 3}
        emb_a = tensors["base_model.model.model.embed_tokens.lora_embedding_A"]
        emb_b = tensors["base_model.model.model.embed_tokens.lora_embedding_B"]
        assert emb_a.shape == (4, VOCAB) and emb_b.shape == (32, 4)
        np.testing.assert_array_equal(tensors["base_model.model.lm_head.lora_A.weight"], emb_b.T)
        layer1_a = params["layers"]["self_attn"]["q_proj"]["kernel_lora_a"][1]
        np.testing.assert_array_equal(
            tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"], layer1_a.T
        )
    if name == "llama":
        assert config["target_modules"] == ["gate_proj", "k_proj", "lm_head", "o_proj"]
        assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (VOCAB, 2)


def test_round_trip_gives_the_same_update(exported):
    name, model, params, _, directory = exported
    back = lj.from_peft(directory, _base_of(params), **_maps(model))
    # Two float32 merges of the same factors (transposed, split or fused on the way; the
    # scale recomputed): within 2·γ_{r+2}·(|W| + |s|·|A||B|) elementwise, the merge of the
    # magnitudes (tolerances.py).
    magnitude = lj.merge(jax.tree.map(np.abs, params))
    n = EXPORTS[name][1].rank + 2
    for (path, bound), mine, theirs in zip(
        jax.tree_util.tree_leaves_with_path(magnitude),
        jax.tree.leaves(lj.merge(back)),
        jax.tree.leaves(lj.merge(params)),
        strict=True,
    ):
        tol.assert_close(mine, theirs, tol.dot_error(bound, n, sides=2), jax.tree_util.keystr(path))


def _base_of(params):
    """The base tree under an adapted one (its LoRA leaves dropped)."""
    if not isinstance(params, dict):
        return params
    return {k: _base_of(v) for k, v in params.items() if "_lora_" not in k}


PEFT_TRAINED = {
    "gpt2": (
        dict(family="gpt2"),
        dict(
            r=4,
            lora_alpha=16,
            target_modules=["c_attn", "c_proj", "c_fc"],
            fan_in_fan_out=True,
            rank_pattern={"c_fc": 2},
        ),
    ),
    "llama-scan-tied": (
        dict(family="llama", scan=True, tie_word_embeddings=True),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "embed_tokens"],
            use_rslora=True,
            ensure_weight_tying=True,
            alpha_pattern={"v_proj": 3},
        ),
    ),
    "llama-scan-one-layer": (
        dict(family="llama", scan=True),
        dict(
            r=2,
            lora_alpha=4,
            target_modules=["up_proj", "lm_head"],
            layers_to_transform=[1],
            layers_pattern="layers",
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(PEFT_TRAINED))
def test_a_peft_adapter_loads_with_equal_logits(name, tmp_path_factory, tmp_path):
    base_args, peft_args = PEFT_TRAINED[name]
    model, base, _ = _base(tmp_path_factory, **base_args)
    hf = hf_model(
        base_args["family"], **{k: v for k, v in base_args.items() if k not in ("family", "scan")}
    )
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(
        hf, peft.LoraConfig(init_lora_weights=False, **peft_args)
    ).eval()
    peft_model.save_pretrained(tmp_path)
    adapted = lj.from_peft(tmp_path, base, **_maps(model))
    theirs = _torch_logits(peft_model)
    tol.assert_close(_our_logits(model, adapted), theirs, _atol(model, theirs, peft_args["r"]))
    if name == "llama-scan-one-layer":  # layer 0 is not adapted: zero factors in the stack
        assert not np.asarray(adapted["layers"]["mlp"]["up_proj"]["kernel_lora_a"][0]).any()


# ---------------------------------------------------------------------------- strictness


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(model, base, PEFT directory) of an untied Llama adapter on q/v and lm_head."""
    model, base, _ = _base(tmp_path_factory, "llama")
    params = _nonzero(
        lj.init(jax.random.key(0), base, lj.LoraConfig(4, 8, "(q|v)_proj/kernel|lm_head"))
    )
    return model, base, lj.to_peft(tmp_path_factory.mktemp("small"), params, **_maps(model))


def _copy(small, tmp_path, edit_tensors=None, edit_config=None):
    model, base, directory = small
    out = tmp_path / "adapter"
    shutil.copytree(directory, out)
    if edit_tensors:
        tensors = load_file(out / "adapter_model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((out / "adapter_config.json").read_text())
        edit_config(config)
        (out / "adapter_config.json").write_text(json.dumps(config))
    return out


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop(f"{Q0}.lora_B.weight"), rf"missing tensor '{Q0}.lora_B.weight'"),
        (
            lambda t: [t.pop(f"{Q0}.lora_A.weight"), t.pop(f"{Q0}.lora_B.weight")],
            rf"missing tensor '{Q0}.lora_A.weight'.*target_modules",
        ),
        (
            lambda t: t.update({f"{Q0}.lora_C.weight": np.zeros(2, np.float32)}),
            rf"unexpected key '{Q0}.lora_C.weight'",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": np.zeros(
                        (4, 32), np.float32
                    )
                }
            ),
            r"unexpected key .*layers\.7.*no weight",
        ),
        (
            lambda t: t.update({f"{Q0}.lora_A.weight": t[f"{Q0}.lora_A.weight"].T.copy()}),
            rf"{Q0}.lora_A.weight: shape \(32, 4\).*needs \(4, 32\); it is transposed",
        ),
        (
            lambda t: t.update(
                {"base_model.model.model.layers.0/../../etc.lora_A.weight": np.zeros(1)}
            ),
            r"unexpected key 'base_model\.model\.model\.layers\.0/\.\./\.\./etc",
        ),
    ],
)
def test_a_damaged_adapter_is_an_error_naming_the_key(small, tmp_path, edit, message):
    directory = _copy(small, tmp_path, edit_tensors=edit)
    with pytest.raises(PeftFormatError, match=message):
        lj.from_peft(directory, small[1], **_maps(small[0]))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c.pop("lora_alpha"),
            r"'lora_alpha' is missing \(PEFT would silently use its default 8\)",
        ),
        (lambda c: c.pop("r"), r"'r' is missing"),
        (lambda c: c.update(use_dora=True), r"use_dora is set"),
        (lambda c: c.update(bias="all"), r"bias='all' is set"),
        (lambda c: c.update(peft_type="IA3"), r"only LoRA"),
        (
            lambda c: c.update(rank_pattern={"q_proj": 2}),
            r"q_proj\.lora_A\.weight: shape \(4, 32\).*needs \(2, 32\)",
        ),
    ],
)
def test_a_bad_config_is_an_error_naming_the_key(small, tmp_path, edit, message):
    directory = _copy(small, tmp_path, edit_config=edit)
    with pytest.raises(PeftFormatError, match=message):
        lj.from_peft(directory, small[1], **_maps(small[0]))


def test_a_base_of_other_shapes_is_refused(small, tmp_path_factory):
    model, _, directory = small
    wider = models.with_options(model.config, hidden_size=48, num_heads=6, num_kv_heads=3)
    wider = jax.jit(models.init_params, static_argnums=0)(wider, jax.random.key(0))
    with pytest.raises(
        PeftFormatError,
        match=r"lora_A\.weight: shape \(4, 32\).*needs \(4, 48\)"
        r".*another base model",
    ):
        lj.from_peft(directory, wider, **_maps(model))


def test_a_base_with_other_weights_is_refused_unless_asked(small):
    model, base, directory = small
    other = jax.tree.map(lambda x: x + 0.01, base)
    with pytest.raises(PeftFormatError, match="other weights.*check_base=False"):
        lj.from_peft(directory, other, **_maps(model))
    forced = lj.from_peft(directory, other, check_base=False, **_maps(model))
    assert "kernel_lora_a" in forced["layers_0"]["self_attn"]["q_proj"]


K0 = "base_model.model.model.layers.0.self_attn.k_proj"


def test_an_untargeted_module_is_named_not_called_another_base(small, tmp_path):
    def add_k_proj(tensors):
        tensors[f"{K0}.lora_A.weight"] = np.ones((4, 32), np.float32)
        tensors[f"{K0}.lora_B.weight"] = np.ones((16, 4), np.float32)

    directory = _copy(small, tmp_path, edit_tensors=add_k_proj)
    with pytest.raises(
        PeftFormatError,
        match=rf"tensor '{K0}.lora_A.weight' adapts module "
        r"'model.layers.0.self_attn.k_proj', which "
        r"target_modules .* does not select",
    ) as e:
        lj.from_peft(directory, small[1], **_maps(small[0]))
    assert "other weights" not in str(e.value)


def test_an_adapter_for_a_shallower_base_says_it_does_not_fit(small, tmp_path_factory):
    _, _, directory = small
    config = json.loads((directory / "adapter_config.json").read_text())
    deeper, base, _ = _base(tmp_path_factory, "llama", num_hidden_layers=4)
    message = r"the adapter does not fit this base 'deep'.*adapts layers 0-1 but .* later layers"
    with pytest.raises(PeftFormatError, match=message):
        lj.from_peft(directory, base, base_name="deep", **_maps(deeper))
    config["base_model_name_or_path"] = "org/two-layers"
    edited = tmp_path_factory.mktemp("named")
    shutil.copytree(directory, edited, dirs_exist_ok=True)
    (edited / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PeftFormatError, match=r"records base_model_name_or_path 'org/two-layers'"):
        lj.from_peft(edited, base, **_maps(deeper))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_factors_are_refused_naming_the_tensor(small, tmp_path, value):
    def poison(tensors):
        tensors[f"{Q0}.lora_B.weight"][3, 1] = value

    directory = _copy(small, tmp_path, edit_tensors=poison)
    with pytest.raises(
        PeftFormatError,
        match=rf"{Q0}.lora_B.weight: 1 of 128 values are NaN or "
        r"infinite; the adapter is damaged",
    ):
        lj.from_peft(directory, small[1], **_maps(small[0]))


def test_a_truncated_file_is_a_clear_error(small, tmp_path):
    directory = _copy(small, tmp_path)
    file = directory / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(PeftFormatError, match="truncated or not a safetensors file"):
        lj.from_peft(directory, small[1], **_maps(small[0]))


def test_nothing_is_unpickled(small, tmp_path, monkeypatch):
    directory = _copy(small, tmp_path)
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(
        FileNotFoundError, match="adapter_model.bin is a pickle and is never loaded"
    ):
        lj.from_peft(directory, small[1], **_maps(small[0]))
    assert lj.from_peft(small[2], small[1], **_maps(small[0]))  # the safetensors path


def test_tied_embedding_adapters_peft_cannot_express_are_refused(tmp_path_factory, tmp_path):
    model, base, _ = _base(tmp_path_factory, "gpt2")  # GPT-2 ties wte to lm_head; PEFT cannot
    params = lj.init(jax.random.key(0), base, lj.LoraConfig(2, 4, "embed_tokens"))
    with pytest.raises(PeftFormatError, match="'transformer.wte' is adapted.*PEFT cannot tie"):
        lj.to_peft(tmp_path, params, **_maps(model))
    model, base, hf = _base(tmp_path_factory, "llama", scan=True, tie_word_embeddings=True)
    untied = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["embed_tokens"]))
    untied.save_pretrained(tmp_path / "untied")
    untied.unload()
    message = "'model.embed_tokens' is adapted and tied.*ensure_weight_tying"
    with pytest.raises(PeftFormatError, match=message):
        lj.from_peft(tmp_path / "untied", base, **_maps(model))


def test_module_names():
    assert default_module_map("layers_3/self_attn/q_proj/kernel", None) == HFModule(
        "model.layers.3.self_attn.q_proj"
    )
    assert default_module_map("layers/mlp/up_proj/kernel", 5).name == "model.layers.5.mlp.up_proj"
    assert default_module_map("embed_tokens/embedding", None).kind == "embedding"
    gpt2 = peft_module_map(models.get_config("tiny-gpt2"))
    assert gpt2("layers_1/self_attn/v_proj/kernel", None) == HFModule(
        "transformer.h.1.attn.c_attn", "conv1d", 2, 3
    )
    assert gpt2("layers_1/input_layernorm/scale", None) is None
    with pytest.raises(PeftFormatError, match="dotted identifiers"):
        bad = lambda path, layer: HFModule("model/../x")
        lj.to_peft(
            "/nonexistent",
            lj.init(
                jax.random.key(0),
                {"d": {"kernel": np.ones((4, 4), np.float32)}},
                lj.LoraConfig(2, 4, "kernel"),
            ),
            bad,
        )


@pytest.mark.slow
def test_smollm2_round_trip_through_peft(tmp_path):
    """The real SmolLM2-135M: our adapter in PEFT, and back, on the same (dequantised) weights."""
    from models.hf_export import save_hf

    model, base, tokenizer = models.load("smollm2-135m", scan_layers=True)
    save_hf(tmp_path / "base", model.config, base, tokenizer)
    params = _nonzero(
        lj.init(jax.random.key(0), base, lj.LoraConfig(8, 16, r"(q|v|down)_proj/kernel"))
    )
    directory = lj.to_peft(tmp_path / "peft", params, **_maps(model))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    ids = np.array([tokenizer.encode("The capital of France is").ids], np.int32)
    with torch.no_grad():
        theirs = (
            peft.PeftModel.from_pretrained(hf, directory)
            .eval()(input_ids=torch.tensor(ids, dtype=torch.long))
            .logits.numpy()
        )
    ours = np.asarray(jax.jit(lj.apply(model.apply))({"params": params}, ids))
    # 30 layers of float32 in XLA vs torch: the chain of tolerances.py (the base model alone
    # differs by ~2e-4 at logits ~30 on this CPU, ~1e-3 of the bound).
    tol.assert_close(ours, theirs, tol.logits_atol(model.config, theirs, ids.shape[1], rank=8))
    back = lj.from_peft(directory, base, **_maps(model))
    for name in ("kernel_lora_a", "kernel_lora_b", "kernel_lora_scale"):
        np.testing.assert_array_equal(
            back["layers"]["mlp"]["down_proj"][name], params["layers"]["mlp"]["down_proj"][name]
        )
