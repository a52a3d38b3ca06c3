"""lora-jax export --format gguf: llama.cpp LoRA adapters (models/gguf_export.py).

Each adapted GGUF tensor's update, as llama.cpp computes it from the file (src/llama-adapter.h
``get_scale``: alpha/r with the file's one alpha and the tensor's rank; ``build_lora_mm``:
scale·B·A), is compared with s·A·B from the adapter's own leaves in float64, the GGUF Q/K
rows mapped back by the loader's ``unpermute_rope_rows`` (the path that reads the base).
The slow test runs llama.cpp itself (llama-cpp-python) on the embedded SmolLM2 GGUF.
"""

from __future__ import annotations

import gguf
import jax
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
