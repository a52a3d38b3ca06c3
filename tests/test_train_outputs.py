"""No command loses a user's file: ``merge``, ``export --format peft`` and ``import-peft``
write only into a new or empty ``--out`` or one they wrote before (train/rundir.py marks),
a failed command takes back the directory it created, and the errors on the way are one
line naming the flag the user can pass."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import lora_jax as lj
import models
from models.loaders.checkpoint import ModelFileError, build_params, expected_shapes
from train import adapter as adapter_lib
from train import cli, export, layout, rundir
from train.rundir import DirectoryError

import train_fixtures as tf

CONFIG = lj.LoraConfig(4, 8, r"(q_proj|v_proj)/kernel")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(model dir, run dir holding adapter/, PEFT export of it, another base's dir)."""
    root = tmp_path_factory.mktemp("outputs")
    model_dir = tf.write_tiny_llama(root / "model")
    _, base, _ = models.load(model_dir)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if str(path[-1].key).endswith("_lora_b") else x,
        lj.init(jax.random.key(0), base, CONFIG),
    )
    adapter_lib.save_adapter(
        root / "run" / "adapter",
        lj.adapter(params),
        method="lora",
        model_name=str(model_dir),
        lora=CONFIG.to_dict(),
        base_fingerprint=adapter_lib.fingerprint(base),
        model_options=dict(dtype="float32", param_dtype="float32", scan_layers=False, remat="none"),
    )
    peft_dir = export.export_peft(root / "run", root / "peft")
    other = tf.write_tiny_llama(root / "other", seed=1)
    return model_dir, root / "run", peft_dir, other


def _foreign(directory, *files):
    """A user's directory holding `files` (paths relative to it); {path: text}."""
    kept = {}
    for name in files:
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"the user's {name}")
        kept[path] = path.read_text()
    return kept


def _intact(directory, kept):
    assert {p: p.read_text() for p in kept} == kept
    assert {p for p in directory.rglob("*") if p.is_file()} == set(kept)  # nothing added


def test_merge_writes_only_into_its_own_directory(run, tmp_path, capsys):
    _, run_dir, _, _ = run
    user = tmp_path / "user"
    kept = _foreign(user, "params/_METADATA", "model.safetensors", "notes.txt")
    with pytest.raises(DirectoryError, match=r"not empty and was not created by lora-jax"):
        export.merge(run_dir, user)
    _intact(user, kept)
    assert "not empty and was not created by lora-jax" in tf.refused(
        ["merge", str(run_dir), "--out", str(user)], capsys
    )
    _intact(user, kept)
    with pytest.raises(DirectoryError):  # not into the run itself either
        export.merge(run_dir, run_dir)
    merged = export.merge(run_dir, tmp_path / "merged", orbax=True)
    assert rundir.owned(merged, layout.Kind.MERGED)
    assert (merged / "model.safetensors").is_file() and (merged / layout.MERGED_PARAMS_DIR).is_dir()
    export.merge(run_dir, merged)  # again into its own directory: replaced
    with pytest.raises(DirectoryError, match="is a lora-jax 'merged' directory, not a 'peft' one"):
        export.export_peft(run_dir, merged)


def test_export_peft_writes_only_into_its_own_directory(run, tmp_path):
    _, run_dir, _, _ = run
    user = tmp_path / "user"
    kept = _foreign(user, "adapter_config.json", "adapter_model.safetensors")
    with pytest.raises(DirectoryError, match=r"not empty and was not created by lora-jax"):
        export.export_peft(run_dir, user)
    _intact(user, kept)
    out = export.export_peft(run_dir, tmp_path / "peft")
    assert rundir.owned(out, layout.Kind.PEFT) and (out / "adapter_config.json").is_file()
    assert export.export_peft(run_dir, out) == out


def test_import_peft_writes_only_into_its_own_directory(run, tmp_path):
    model_dir, run_dir, peft_dir, _ = run
    user = tmp_path / "user"
    kept = _foreign(user, "weights/keep", "adapter.json")
    with pytest.raises(DirectoryError, match=r"not empty and was not created by lora-jax"):
        export.import_peft(peft_dir, str(model_dir), user)
    _intact(user, kept)
    # a training run's adapter is an adapter directory, but not import-peft's to replace
    trained = (run_dir / "adapter" / layout.ADAPTER_META_FILE).read_text()
    with pytest.raises(DirectoryError, match=r"holds an adapter that import-peft did not write"):
        export.import_peft(peft_dir, str(model_dir), run_dir / "adapter")
    assert (run_dir / "adapter" / layout.ADAPTER_META_FILE).read_text() == trained
    out = export.import_peft(peft_dir, str(model_dir), tmp_path / "imported")
    assert adapter_lib.read_meta(out)[export.IMPORTED_FROM] == str(peft_dir.absolute())
    assert export.import_peft(peft_dir, str(model_dir), out) == out  # its own: replaced
    _, base, _ = models.load(model_dir)
    assert "kernel_lora_a" in adapter_lib.load_adapter(out, base)["layers_0"]["self_attn"]["q_proj"]


def test_the_command_line_names_its_flag_and_takes_back_a_failed_out(run, tmp_path, capsys):
    _, _, peft_dir, other = run
    out = tmp_path / "new" / "imported"
    argv = ["import-peft", str(peft_dir), "--model", str(other), "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other weights" in err
    assert "pass --skip-base-check" in err and "check_base" not in err
    assert not (tmp_path / "new").exists()  # created by the failed command: removed again
    assert cli.main([*argv, "--skip-base-check"]) == 0
    assert rundir.owned(out, layout.Kind.ADAPTER)


def test_checkpoint_errors_are_one_line_with_the_fix():
    config = models.get_config("tiny-gpt2")
    with pytest.raises(ModelFileError) as e:
        build_params({}, [f"h.{i}.extra" for i in range(9)], config, "ckpt")
    message = str(e.value)
    assert "\n" not in message and "parameters missing" in message and "and 4 more" in message
    assert "9 unexpected tensors" in message and "download or save it again" in message
    named = {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(config).items()}
    name = sorted(named)[0]
    named[name] = np.zeros((3,), np.float32)
    with pytest.raises(ModelFileError, match=rf"{name} has shape \(3,\).*do not belong") as e:
        build_params(named, [], config, "ckpt")
    assert "\n" not in str(e.value)
