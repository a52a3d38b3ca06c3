"""train/adapter.py: the adapter-only directory round-trips and refuses a wrong base."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

import models
from train import adapter as adapter_lib
from train import cli, layout, rundir
from train import method as method_lib
from train.config import LoraSection
from train.rundir import DirectoryError

import train_fixtures as tf

SECTION = LoraSection(rank=4, targets=(".*/(q_proj|v_proj)/kernel",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base params, adapted params with non-zero B, adapter directory)."""
    root = tmp_path_factory.mktemp("adapter")
    _, base, _ = models.load(tf.write_tiny_llama(root / "model"))
    params, mask = method_lib.prepare("lora", base, SECTION, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.5 if path[-1].key == "kernel_lora_b" else x, params
    )
    directory = adapter_lib.save_adapter(
        root / "adapter",
        adapter_lib.artifact(params, mask, base),
        method="lora",
        model_name="tiny",
        lora=method_lib.lora_config(SECTION).to_dict(),
        base_fingerprint=adapter_lib.fingerprint(base),
    )
    return base, params, directory


def test_round_trip_restores_the_adapted_tree(trained):
    base, params, directory = trained
    loaded = adapter_lib.load_adapter(directory, base)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    meta = adapter_lib.read_meta(directory)
    assert meta["method"] == "lora" and meta["lora"]["rank"] == 4
    assert set(meta["leaves"]) == {
        f"layers_{i}/self_attn/{m}/kernel_lora_{x}"
        for i in range(2)
        for m in ("q_proj", "v_proj")
        for x in ("a", "b", "scale")
    }


def test_a_base_with_other_weights_is_refused(trained, tmp_path):
    _, _, directory = trained
    _, other, _ = models.load(tf.write_tiny_llama(tmp_path / "other", seed=1))
    with pytest.raises(adapter_lib.AdapterError, match="same shapes but different weights"):
        adapter_lib.load_adapter(directory, other)
    # The explicit override applies the adapter's own leaves to the other base.
    loaded = adapter_lib.load_adapter(directory, other, check_weights=False)
    q = loaded["layers_0"]["self_attn"]["q_proj"]
    assert q["kernel"] is other["layers_0"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(
        q["kernel_lora_b"],
        np.asarray(trained[1]["layers_0"]["self_attn"]["q_proj"]["kernel_lora_b"]),
    )


def test_a_base_of_another_shape_is_refused_naming_the_parameter(trained):
    _, _, directory = trained
    gpt2 = models.init_params(models.get_config("tiny-gpt2"), jax.random.key(0))
    with pytest.raises(adapter_lib.AdapterError, match=r"wrong base model: .*parameter 'embed_"):
        adapter_lib.load_adapter(directory, gpt2)


def test_damaged_adapter_directories_are_refused(trained, tmp_path):
    base, _, directory = trained
    broken = shutil.copytree(directory, tmp_path / "broken")
    shutil.rmtree(broken / layout.ADAPTER_WEIGHTS_DIR / "d")
    with pytest.raises(adapter_lib.AdapterError, match="truncated or corrupted"):
        adapter_lib.load_adapter(broken, base)
    (broken / layout.ADAPTER_META_FILE).unlink()
    with pytest.raises(adapter_lib.AdapterError, match="adapter.json is missing"):
        adapter_lib.load_adapter(broken, base)


# ---------------------------------------------------------------------------- trust


def _save(directory, trained):
    base, params, _ = trained
    mask = method_lib.prepare("lora", base, SECTION, jax.random.key(0))[1]
    return adapter_lib.save_adapter(
        directory,
        adapter_lib.artifact(params, mask, base),
        method="lora",
        model_name="tiny",
        lora=method_lib.lora_config(SECTION).to_dict(),
        base_fingerprint=adapter_lib.fingerprint(base),
    )


def test_save_adapter_never_writes_over_files_it_did_not_write(trained, tmp_path):
    foreign = tmp_path / "foreign"
    (foreign / layout.ADAPTER_WEIGHTS_DIR).mkdir(parents=True)
    (foreign / layout.ADAPTER_WEIGHTS_DIR / "mine.txt").write_text("keep")
    (foreign / layout.ADAPTER_META_FILE).write_text('{"mine": true}')
    with pytest.raises(DirectoryError, match="not empty and was not created by lora-jax") as e:
        _save(foreign, trained)
    assert "\n" not in str(e.value)
    assert (foreign / layout.ADAPTER_WEIGHTS_DIR / "mine.txt").read_text() == "keep"
    assert (foreign / layout.ADAPTER_META_FILE).read_text() == '{"mine": true}'
    assert sorted(p.name for p in foreign.iterdir()) == [
        layout.ADAPTER_META_FILE,
        layout.ADAPTER_WEIGHTS_DIR,
    ]
    # a new directory is claimed; saving into it again (its own mark) replaces its weights
    own = _save(tmp_path / "own", trained)
    assert rundir.owned(own, layout.Kind.ADAPTER)
    assert _save(own, trained) == own
    base, params, _ = trained
    loaded = adapter_lib.load_adapter(own, base)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # another lora-jax kind (a run directory) is not an adapter directory
    run = rundir.claim(tmp_path / "run", "run")
    with pytest.raises(
        DirectoryError, match="is a lora-jax 'run' directory, not an? 'adapter' one"
    ):
        _save(run, trained)


def _with_meta(directory, tmp_path, edit):
    copy = shutil.copytree(directory, tmp_path / "copy")
    file = copy / layout.ADAPTER_META_FILE
    file.write_text(edit(file.read_text()))
    return copy


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda text: text[: len(text) // 2],
            r"adapter.json is damaged: not valid JSON \(.*\); restore",
        ),
        (lambda text: "", r"adapter.json is damaged: not valid JSON"),
        (lambda text: "[1, 2]", r"adapter.json is damaged: it holds a JSON list, not an object"),
        (
            lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "leaves"}),
            r"adapter.json is damaged: 'leaves' is missing",
        ),
        (
            lambda text: text.replace('"float32"', '"float99"', 1),
            r"adapter.json is damaged: leaves\[.*'dtype': 'float99'",
        ),
        (
            lambda text: text.replace('"sample_sha256"', '"sample"', 1),
            r"'base_fingerprint.sample_sha256' is missing",
        ),
    ],
)
def test_a_damaged_adapter_json_is_one_line_naming_the_file_and_the_fix(
    trained, tmp_path, edit, message
):
    base, _, directory = trained
    broken = _with_meta(directory, tmp_path, edit)
    for call in (
        lambda: adapter_lib.read_meta(broken),
        lambda: adapter_lib.load_adapter(broken, base),
    ):
        with pytest.raises(adapter_lib.AdapterError, match=message) as e:
            call()
        assert "\n" not in str(e.value) and "lora-jax train" in str(e.value)


def test_an_adapter_json_that_changes_a_leaf_is_refused_not_cast(trained, tmp_path):
    base, _, directory = trained
    leaf = "layers_0/self_attn/q_proj/kernel_lora_a"

    def retype(text, key, value):
        meta = json.loads(text)
        meta["leaves"][leaf][key] = value
        return json.dumps(meta)

    recast = _with_meta(directory, tmp_path, lambda t: retype(t, "dtype", "bfloat16"))
    with pytest.raises(
        adapter_lib.AdapterError,
        match=rf"records leaf '{leaf}' as bfloat16\[32, 4\], but .*weights holds "
        r"float32\[32, 4\]; nothing is cast",
    ) as e:
        adapter_lib.load_adapter(recast, base)
    assert "\n" not in str(e.value)
    shutil.rmtree(recast)
    reshaped = _with_meta(directory, tmp_path, lambda t: retype(t, "shape", [4, 32]))
    with pytest.raises(adapter_lib.AdapterError, match=r"as float32\[4, 32\], but"):
        adapter_lib.load_adapter(reshaped, base)


def test_the_merge_command_reports_a_damaged_adapter_json_in_one_line(trained, tmp_path, capsys):
    _, _, directory = trained
    broken = _with_meta(directory, tmp_path, lambda text: text[:100])
    out = tmp_path / "merged"
    assert cli.main(["merge", str(broken), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "adapter.json is damaged: not valid JSON" in err
    assert not out.exists()  # the failed command takes back the directory it created
