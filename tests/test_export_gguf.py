"""lora-jax export --format gguf: llama.cpp LoRA adapters (models/gguf_export.py).

Each adapted GGUF tensor's update, as llama.cpp computes it from the file (src/llama-adapter.h
``get_scale``: alpha/r with the file's one alpha and the tensor's rank; ``build_lora_mm``:
scale·B·A), is compared with s·A·B from the adapter's own leaves in float64, the GGUF Q/K
rows mapped back by the loader's ``unpermute_rope_rows`` (the path that reads the base).
The slow test runs llama.cpp itself (llama-cpp-python) on the embedded SmolLM2 GGUF.
"""

from __future__ import annotations

import math

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest

import lora_jax as lj
import models
from models import gguf_export
from models.loaders.gguf import unpermute_rope_rows
from train import adapter as adapter_lib
from train import cli, export

import tolerances as tol
import train_fixtures as tf

# rsLoRA, a rank pattern and an alpha pattern: four different scales, two ranks
CONFIG = lj.LoraConfig(
    4,
    8,
    r"(q_proj|k_proj|v_proj|o_proj|up_proj|down_proj)/kernel|embed_tokens",
    use_rslora=True,
    rank_pattern={"v_proj": 2},
    alpha_pattern={"down_proj": 3.0},
)
OPTIONS = dict(dtype="float32", param_dtype="float32", scan_layers=True, remat="none")


def _bumped(params, size=0.1):
    def bump(path, x):
        if str(path[-1].key).endswith(("_lora_a", "_lora_b")):
            return x + size * jax.random.normal(jax.random.key(x.size), x.shape)
        return x

    return jax.tree_util.tree_map_with_path(bump, params)


def _save(directory, model_name, base, params, config=CONFIG, options=OPTIONS):
    adapter_lib.save_adapter(
        directory,
        lj.adapter(params),
        method="lora",
        model_name=str(model_name),
        lora=config.to_dict(),
        base_fingerprint=adapter_lib.fingerprint(base),
        model_options=options,
    )
    return directory


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model_dir = tf.write_tiny_llama(root / "model")
    model, base, _ = models.load(model_dir, scan_layers=True)
    params = _bumped(lj.init(jax.random.key(0), base, CONFIG))
    return model, params, _save(root / "adapter", model_dir, base, params)


def _read(path):
    reader = gguf.GGUFReader(path)
    fields = {k: reader.fields[k].contents() for k in reader.fields if not k.startswith("GGUF.")}
    tensors = {t.name: np.asarray(t.data, np.float64) for t in reader.tensors}
    return fields, tensors


def test_the_file_is_llama_cpp_s_adapter_with_each_update_exact(run, tmp_path):
    model, params, adapter = run
    out = tmp_path / "adapter.gguf"
    assert cli.main(["export", "--format", "gguf", str(adapter), "--out", str(out)]) == 0
    fields, tensors = _read(out)
    assert (fields["general.type"], fields["adapter.type"]) == ("adapter", "lora")
    assert fields["general.architecture"] == "llama"
    alpha = np.float32(fields["adapter.lora.alpha"])
    config = model.config
    flat = lj.flatten_paths(params)
    checked = 0
    for key in [k for k in flat if k.endswith("_lora_a")]:
        weight = key[: -len("_lora_a")]
        a, b = (np.asarray(flat[weight + s], np.float64) for s in ("_lora_a", "_lora_b"))
        s = np.asarray(flat[weight + "_lora_scale"], np.float64)
        embedding = weight.endswith("embedding")
        for layer in range(config.num_layers) if weight.startswith("layers/") else [None]:
            pick = (lambda x: x) if layer is None else (lambda x: x[layer])
            a_IxR, b_RxO, s_l = pick(a), pick(b), float(pick(s))
            expected = s_l * a_IxR @ b_RxO  # (in, out), or (vocab, dim) for the embedding
            name = models.families.locate(config, weight, layer).tensor("gguf")
            lora_a, lora_b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
            rank = lora_b.shape[1]
            applied = np.float64(np.float32(alpha / np.float32(rank)))  # llama.cpp's get_scale
            if embedding:  # rows of lora_a (vocab, r) through lora_b (dim, r)
                update = applied * lora_a @ lora_b.T
            else:  # (out, in) = scale · lora_b (out, r) @ lora_a (r, in)
                update = (applied * lora_b @ lora_a).T
                rope = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
                heads = next((h for m, h in rope.items() if f"/{m}/" in weight), None)
                if heads:  # GGUF column j of the update is Hugging Face column rows[j]
                    rows = unpermute_rope_rows(np.arange(update.shape[1]), heads)
                    update = update[:, rows]
            # one float32 rounding of s/scale·B, one of alpha/r: n = 2 against float64
            bound = tol.dot_error(abs(s_l) * np.abs(a_IxR) @ np.abs(b_RxO), 2)
            tol.assert_close(update, expected, bound, f"{name} (layer {layer})")
            checked += 1
    assert checked == 6 * config.num_layers + 1


def test_refusals_are_one_line_and_touch_nothing(run, tmp_path, capsys):
    model, params, adapter = run
    user = tmp_path / "mine.gguf"
    user.write_text("the user's file")
    argv = ["export", "--format", "gguf", str(adapter), "--out", str(user)]
    assert cli.main(argv) == 2
    assert "was not written by lora-jax" in capsys.readouterr().err
    assert user.read_text() == "the user's file"
    ours = tmp_path / "ours.gguf"
    assert export.export_gguf(adapter, ours) == ours
    assert export.export_gguf(adapter, ours) == ours  # its own file: replaced
    assert {p.name for p in tmp_path.iterdir()} == {"mine.gguf", "ours.gguf"}  # no leftovers
    assert cli.main([*argv[:-1], str(ours), "--serving-safe"]) == 2
    assert "PEFT options" in capsys.readouterr().err

    tied_dir = tf.write_tiny_llama(tmp_path / "tied")
    _, base, _ = models.load(tied_dir)
    tied_config = lj.LoraConfig(2, 4, r"embed_tokens")
    tied = lj.init(jax.random.key(1), base, tied_config)
    saved = _save(tmp_path / "tied_adapter", tied_dir, base, tied, tied_config, None)
    # the tiny Llama is untied: the embedding is exported; a tied model is refused
    export.export_gguf(saved, tmp_path / "untied.gguf")
    tied_model = models.with_options(models.load(tied_dir)[0].config, tie_word_embeddings=True)
    with pytest.raises(gguf_export.GGUFExportError, match="tied embeddings"):
        gguf_export.lora_tensors(tied_model, tied)


@pytest.mark.slow
def test_llama_cpp_applies_the_export_as_lora_jax_does(tmp_path):
    """llama.cpp (llama-cpp-python, installed by the Makefile) on the embedded Q4_1 SmolLM2
    GGUF with the exported adapter, against lora-jax's unmerged forward on the same weights
    dequantised: the same greedy tokens, logits within the bound below."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="make test installs llama-cpp-python")
    model, base, tokenizer = models.load("smollm2-135m")
    # Q and K: the rows GGUF permutes; rsLoRA with two ranks: two scales under one alpha. An
    # adapter that keeps the model fluent: one that wrecks it amplifies llama.cpp's rounding.
    config = lj.LoraConfig(
        8, 16, r"(q_proj|k_proj)/kernel", use_rslora=True, rank_pattern={"k_proj": 4}
    )
    params = _bumped(lj.init(jax.random.key(0), base, config), size=0.05)
    options = dict(dtype="float32", param_dtype="float32", scan_layers=False, remat="none")
    adapter = _save(tmp_path / "adapter", "smollm2-135m", base, params, config, options)
    out = export.export_gguf(adapter, tmp_path / "adapter.gguf")
    llm = llama_cpp.Llama(
        model_path=str(models.embedded_gguf("smollm2-135m")),
        lora_path=str(out),
        n_ctx=64,
        logits_all=True,
        verbose=False,
        n_threads=2,
    )
    ids = tokenizer.encode("The capital of France is").ids
    llm.eval(ids)
    for _ in range(NEW_TOKENS):  # llama.cpp's own greedy continuation
        ids.append(int(np.argmax(llm.scores[len(ids) - 1])))
        llm.eval(ids[-1:])
    theirs = np.asarray(llm.scores[: len(ids)], np.float64)
    ours = np.asarray(jax.jit(lj.apply(model.apply))({"params": params}, np.array([ids])))[0]
    atol = _llama_cpp_atol(model.config, ours)
    tol.assert_close(theirs, ours, atol, "llama.cpp against lora-jax")
    # the adapter moves the logits far beyond that bound, so a misread adapter cannot pass
    unadapted = {k: v for k, v in lj.flatten_paths(params).items() if "_lora_" not in k}
    base_logits = np.asarray(model.apply({"params": lj.unflatten_paths(unadapted)}, [ids]))[0]
    assert np.max(np.abs(ours - base_logits)) > 4 * atol
    # every greedy token llama.cpp picked is lora-jax's top-1, or within the bound of it
    chosen = ours[np.arange(len(ids) - 1), ids[1:]]
    prompt = len(ids) - NEW_TOKENS - 1
    assert np.all(chosen[prompt:] >= ours[prompt:-1].max(-1) - 2 * atol)


NEW_TOKENS = 8


def _llama_cpp_atol(config, expected) -> float:
    """|llama.cpp − lora-jax| for logits of the same dequantised weights.

    llama.cpp's CPU kernels multiply Q4_1 weights by activations quantised to Q8_1: each
    block of 32 rounded to 8 bits, an error of at most 1/254 of the block's largest value,
    i.e. bfloat16's unit roundoff u = 2^-8 relative to the block; its K/V cache and the
    attention products round to float16 (2^-11, counted at u too). That is n = 5 such
    roundings per layer (the attention input, o_proj's, the MLP input, down_proj's, the
    cache) and one for the head. Against n·u ≈ 0.6 the worst case (tolerances.chain_atol)
    is vacuous, so this takes the typical size of n independent roundings, √n·u (the
    tolerances.py docstring: the worst case is ~√n times it), at the logits' scale, on
    two sides. The adapter's own products are float32 (a negligible 2^-24 each).
    Measured on the embedded SmolLM2: 0.63 of this bound (0.41 without the adapter); the
    adapter moves the logits by 8x it.
    """
    n = 5 * config.num_layers + 1
    return 2 * math.sqrt(n) * tol.unit_roundoff(ml_dtypes.bfloat16) * tol.scale_of(expected)
