"""models/hf_export.py and train/export.py: merged Hugging Face checkpoints that transformers
loads with our logits, and the merge / export --format peft / import-peft commands."""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

import lora_jax as lj
import models
from models.hf_export import save_hf
from train import adapter as adapter_lib
from train import cli, export, layout

import tolerances as tol
import train_fixtures as tf
from test_peft import hf_model

IDS = np.random.default_rng(0).integers(3, 96, size=(2, 7)).astype(np.int32)
TARGETS = r"(q_proj|v_proj|up_proj)/kernel|embed_tokens"


def _bumped(params):
    """LoRA factors plus noise (a trained-looking adapter)."""

    def bump(path, x):
        if str(path[-1].key).endswith(("_lora_a", "_lora_b")):
            return x + 0.1 * jax.random.normal(jax.random.key(x.size), x.shape)
        return x

    return jax.tree_util.tree_map_with_path(bump, params)


def _atol(model, expected, rank=0):
    """Two float32 evaluations of the logits (ours and torch's, factored and merged): the
    decoder's chain of tolerances.py, with a rank-`rank` adapter beside the projections."""
    return tol.logits_atol(model.config, expected, keys=expected.shape[-2], rank=rank)


def _torch_logits(directory, ids=IDS) -> np.ndarray:
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize(
    "family, scan, overrides",
    [
        ("gpt2", False, {}),
        ("llama", True, dict(tie_word_embeddings=True)),
        ("llama", False, {}),
    ],
)
def test_a_merged_checkpoint_loads_in_transformers_with_our_logits(
    family, scan, overrides, tmp_path
):
    hf_model(family, **overrides).save_pretrained(tmp_path / "base")
    model, base, _ = models.load(tmp_path / "base", scan_layers=scan)
    targets = TARGETS if family == "llama" else r"(q_proj|v_proj|up_proj)/kernel"
    merged = lj.merge(_bumped(lj.init(jax.random.key(1), base, lj.LoraConfig(4, 8, targets))))
    save_hf(tmp_path / "merged", model.config, merged)
    ours = np.asarray(model.apply({"params": merged}, IDS))
    tol.assert_close(_torch_logits(tmp_path / "merged"), ours, _atol(model, ours))
    _, loaded, _ = models.load(tmp_path / "merged", scan_layers=scan)  # the inverse of load
    for mine, theirs in zip(jax.tree.leaves(loaded), jax.tree.leaves(merged), strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))


def test_llama_biases_export_to_transformers_with_our_logits(tmp_path):
    hf = hf_model("llama", attention_bias=True, mlp_bias=True)
    with torch.no_grad():  # transformers initialises biases to zero
        for name, parameter in hf.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path / "base")
    model, params, _ = models.load(tmp_path / "base", scan_layers=True)
    save_hf(tmp_path / "out", model.config, params)
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_config["attention_bias"] is True and hf_config["mlp_bias"] is True
    ours = np.asarray(jax.jit(model.apply)({"params": params}, IDS))
    tol.assert_close(_torch_logits(tmp_path / "out"), ours, _atol(model, ours))


def test_a_tree_with_lora_leaves_is_refused(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "base")
    model, base, _ = models.load(tmp_path / "base")
    adapted = lj.init(jax.random.key(1), base, lj.LoraConfig(2, 4, "q_proj/kernel"))
    with pytest.raises(ValueError, match=r"kernel_lora_a' has no Hugging Face name; export merged"):
        save_hf(tmp_path / "out", model.config, adapted)


# ----------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(model dir, run dir, adapted params): a LoRA run's adapter on a tiny scanned Llama."""
    root = tmp_path_factory.mktemp("run")
    model_dir = tf.write_tiny_llama(root / "model")
    _, base, _ = models.load(model_dir, scan_layers=True)
    config = lj.LoraConfig(4, 8, r"(q_proj|v_proj)/kernel|embed_tokens", use_rslora=True)
    params = _bumped(lj.init(jax.random.key(0), base, config))
    adapter_lib.save_adapter(
        root / "out" / "adapter",
        lj.adapter(params),
        method="lora",
        model_name=str(model_dir),
        lora=config.to_dict(),
        base_fingerprint=adapter_lib.fingerprint(base),
        model_options=dict(dtype="float32", param_dtype="float32", scan_layers=True, remat="none"),
    )
    return model_dir, root / "out", params


def _ids():
    return np.array([tf.tokenizer().encode("name[The Eagle] food").ids], np.int32)


def test_merge_writes_a_transformers_checkpoint_and_orbax_params(run, tmp_path):
    model_dir, run_dir, params = run
    out = export.merge(run_dir, tmp_path / "merged", orbax=True)
    model, _, _ = models.load(model_dir, scan_layers=True)
    ids = _ids()
    ours = np.asarray(lj.apply(model.apply)({"params": params}, ids))
    atol = _atol(model, ours, rank=4)  # factored against merged
    tol.assert_close(_torch_logits(out, ids), ours, atol)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer("name[The Eagle] food")["input_ids"] == ids[0].tolist()
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(out.resolve() / layout.MERGED_PARAMS_DIR)
    tol.assert_close(model.apply({"params": restored}, ids), ours, atol)


def test_export_peft_runs_in_peft_and_imports_back(run, tmp_path):
    peft = pytest.importorskip("peft")
    model_dir, run_dir, params = run
    exported = export.export_peft(run_dir / "adapter", tmp_path / "peft")
    config = json.loads((exported / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["base_model_name_or_path"] == str(model_dir)
    ids = _ids()
    model, _, _ = models.load(model_dir, scan_layers=True)
    ours = np.asarray(lj.apply(model.apply)({"params": params}, ids))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs = (
            peft.PeftModel.from_pretrained(hf, exported)
            .eval()(input_ids=torch.tensor(ids, dtype=torch.long))
            .logits.numpy()
        )
    atol = _atol(model, ours, rank=4)
    tol.assert_close(theirs, ours, atol)

    imported = export.import_peft(exported, str(model_dir), tmp_path / "imported")
    unscanned, base, _ = models.load(model_dir)  # import-peft loads the base unscanned
    back = adapter_lib.load_adapter(imported, base)
    tol.assert_close(lj.apply(unscanned.apply)({"params": back}, ids), ours, atol)


def test_the_commands_parse_and_name_a_missing_adapter(tmp_path, capsys):
    args = cli.parser().parse_args(["export", "--format", "peft", "runs/x", "--out", "y"])
    assert (args.run, args.adapter, args.out, args.format) == (
        "train.export:run_export",
        "runs/x",
        "y",
        "peft",
    )
    assert cli.main(["merge", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "neither a run directory nor an adapter directory" in capsys.readouterr().err
