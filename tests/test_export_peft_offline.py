"""PEFT exports that load where users load them: ``AutoPeftModelForCausalLM.from_pretrained``
finds the base from ``base_model_name_or_path`` alone, offline (HF_HUB_OFFLINE=1, in a
fresh process), with lora-jax's logits; ``--serving-safe`` gives one r and alpha and the
same logits; merged checkpoints are 0644 and hold one copy of the weights."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_export_gguf import CONFIG, _bumped, _save

import lora_jax as lj
import models
from train import cli, export, layout

import tolerances as tol
import train_fixtures as tf

IDS = np.array([[5, 17, 3, 42, 8, 23, 11]], np.int32)

# Loads PEFT directories as a user would, knowing nothing but the directory; saves
# <directory>/logits.npy for the token ids in argv[1].
_LOAD = """
import sys, numpy as np, torch
from peft import AutoPeftModelForCausalLM
ids = torch.tensor(np.load(sys.argv[1]), dtype=torch.long)
for directory in sys.argv[2:]:
    model = AutoPeftModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    with torch.no_grad():
        np.save(directory + "/logits.npy", model.eval()(input_ids=ids).logits.numpy())
"""


def _auto_peft_logits(directories, tmp_path) -> list[np.ndarray]:
    """Each directory's logits from one fresh process with the hub offline (one torch import)."""
    np.save(tmp_path / "ids.npy", IDS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = [sys.executable, "-c", _LOAD, str(tmp_path / "ids.npy"), *map(str, directories)]
    subprocess.run(argv, check=True, env=env)
    return [np.load(d / "logits.npy") for d in directories]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    model_dir = tf.write_tiny_llama(root / "model")
    model, base, _ = models.load(model_dir, scan_layers=True)
    params = _bumped(lj.init(jax.random.key(0), base, CONFIG))
    adapter = _save(root / "adapter", model_dir, base, params)
    ours = np.asarray(lj.apply(model.apply)({"params": params}, IDS))
    # ours (factored) against PEFT's torch forward: the decoder chain of tolerances.py
    atol = tol.logits_atol(model.config, ours, keys=IDS.shape[1], rank=CONFIG.rank)
    return adapter, ours, atol


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    """(plain export, serving-safe export, what --serving-safe printed, their PEFT logits)."""
    adapter, _, _ = run
    root = tmp_path_factory.mktemp("exports")
    plain, safe = root / "peft", root / "safe"
    assert cli.main(["export", "--format", "peft", str(adapter), "--out", str(plain)]) == 0
    said = []
    export.export_peft(adapter, safe, serving_safe=True, say=said.append)
    return plain, safe, said, _auto_peft_logits([plain, safe], root)


def test_auto_peft_loads_the_export_offline_with_our_logits(run, exports):
    _, ours, atol = run
    plain, _, _, (logits, _) = exports
    written = json.loads((plain / "adapter_config.json").read_text())
    assert written["rank_pattern"] and written["use_rslora"]  # the patterns survive as PEFT's
    tol.assert_close(logits, ours, atol)


def test_serving_safe_has_one_rank_and_alpha_and_the_same_logits(run, exports, capsys):
    adapter, ours, atol = run
    _, out, said, (_, logits) = exports
    said = "\n".join(said)
    assert "ranks [2, 4] padded with zeros to r=4" in said and "folded into lora_B" in said
    argv = ["export", "--format", "peft", str(adapter), "--out", str(out), "--serving-safe"]
    assert cli.main(argv) == 0  # the command line prints the same, and replaces its own export
    assert said in capsys.readouterr().out
    written = json.loads((out / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["use_rslora"]) == (4, 4, False)
    assert not written["rank_pattern"] and not written["alpha_pattern"]
    assert not written["modules_to_save"]
    # B·s rounds once more in float32 than s·(x·A)·B: within the same chain bound
    tol.assert_close(logits, ours, atol)


def test_merged_checkpoint_is_one_copy_readable_by_all(run, tmp_path):
    adapter, ours, atol = run
    out = tmp_path / "merged"
    assert cli.main(["merge", str(adapter), "--out", str(out)]) == 0
    assert not (out / layout.MERGED_PARAMS_DIR).exists()  # orbax only with --orbax
    for file in out.iterdir():
        if file.is_file() and not file.name.startswith("."):  # the mark is rundir's
            assert stat.S_IMODE(file.stat().st_mode) == 0o644, file
    model, merged, _ = models.load(out, scan_layers=True)
    tol.assert_close(model.apply({"params": merged}, IDS), ours, atol)
    base = tmp_path / "base"
    assert cli.main(["merge", str(adapter), "--out", str(base), "--base-only"]) == 0
    _, loaded, _ = models.load(base, scan_layers=True)
    _, original, _ = models.load(adapter_base(adapter), scan_layers=True)
    for mine, theirs in zip(jax.tree.leaves(loaded), jax.tree.leaves(original), strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))


def adapter_base(adapter):
    return json.loads((adapter / layout.ADAPTER_META_FILE).read_text())["model"]


def test_a_gguf_base_names_merge_base_only(tmp_path):
    meta = {"model": "smollm2-135m"}
    with pytest.raises(export.adapter_lib.AdapterError, match="merge --base-only"):
        export.base_model_name_or_path(meta)
    assert export.base_model_name_or_path({"model": str(tmp_path)}) == str(tmp_path.absolute())
