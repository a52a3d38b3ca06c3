"""train/adapter.py: the adapter-only directory round-trips and refuses a wrong base."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

import models
import train_fixtures as tf
from train import adapter as adapter_lib
from train import method as method_lib
from train.config import LoraSection

SECTION = LoraSection(rank=4, targets=(".*/(q_proj|v_proj)/kernel",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base params, adapted params with non-zero B, adapter directory)."""
    root = tmp_path_factory.mktemp("adapter")
    _, base, _ = models.load(tf.write_tiny_llama(root / "model"))
    params, mask = method_lib.prepare("lora", base, SECTION, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.5 if path[-1].key == "kernel_lora_b" else x, params)
    directory = adapter_lib.save_adapter(
        root / "adapter", adapter_lib.artifact(params, mask, base), method="lora",
        model_name="tiny", lora=method_lib.lora_config(SECTION).to_dict(),
        base_fingerprint=adapter_lib.fingerprint(base))
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
        f"layers_{i}/self_attn/{m}/kernel_lora_{x}" for i in range(2)
        for m in ("q_proj", "v_proj") for x in ("a", "b", "scale")}


def test_a_base_with_other_weights_is_refused(trained, tmp_path):
    _, _, directory = trained
    _, other, _ = models.load(tf.write_tiny_llama(tmp_path / "other", seed=1))
    with pytest.raises(adapter_lib.AdapterError, match="same shapes but different weights"):
        adapter_lib.load_adapter(directory, other)
    # The explicit override applies the adapter's own leaves to the other base.
    loaded = adapter_lib.load_adapter(directory, other, check_weights=False)
    q = loaded["layers_0"]["self_attn"]["q_proj"]
    assert q["kernel"] is other["layers_0"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(q["kernel_lora_b"], np.asarray(
        trained[1]["layers_0"]["self_attn"]["q_proj"]["kernel_lora_b"]))


def test_a_base_of_another_shape_is_refused_naming_the_parameter(trained):
    _, _, directory = trained
    gpt2 = models.init_params(models.get_config("tiny-gpt2"), jax.random.key(0))
    with pytest.raises(adapter_lib.AdapterError, match=r"wrong base model: .*parameter 'embed_"):
        adapter_lib.load_adapter(directory, gpt2)


# orbax leaves an asyncio callback behind after a failed restore; harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_adapter_directories_are_refused(trained, tmp_path):
    base, _, directory = trained
    broken = shutil.copytree(directory, tmp_path / "broken")
    shutil.rmtree(broken / adapter_lib.WEIGHTS_DIR / "d")
    with pytest.raises(adapter_lib.AdapterError, match="truncated or corrupted"):
        adapter_lib.load_adapter(broken, base)
    (broken / adapter_lib.META_FILE).unlink()
    with pytest.raises(adapter_lib.AdapterError, match="adapter.json is missing"):
        adapter_lib.load_adapter(broken, base)
