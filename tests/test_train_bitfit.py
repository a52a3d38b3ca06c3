"""BitFit on a bias-free Llama: ``model.add_biases=true`` gives it zero biases to train; the
adapter loads, merges and loads back with them. (Without the option BitFit is refused:
tests/test_train_step.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import models
from models.hf_export import save_hf
from train import export
from train.config import ConfigError, ModelConfig, RunConfig
from train.run import train
from train.setup import load_model

import train_fixtures as tf

pytestmark = pytest.mark.usefixtures("jax_compilation_cache")

QUIET = {"log": lambda _: None}
# Out-features of q, k, v, o, gate, up and down in one layer: one bias element each.
BIASES_PER_LAYER = (
    tf.HEADS * tf.HEAD_DIM + 2 * tf.KV_HEADS * tf.HEAD_DIM + tf.HIDDEN + 2 * tf.MLP + tf.HIDDEN
)


def test_bitfit_on_llama_trains_only_the_added_biases(run_files, tmp_path):
    model_dir, csv, root = run_files
    result = train(
        tf.tiny_config(
            model_dir,
            csv,
            root / "bitfit",
            "method=bitfit",
            "model.add_biases=true",
            "optim.max_steps=3",
            "data.validation_fraction=0",
        ),
        **QUIET,
    )
    trained = traverse_util.flatten_dict(result.state["params"])
    assert {path[-1] for path in trained} == {"bias"}
    assert sum(leaf.size for leaf in trained.values()) == tf.LAYERS * BIASES_PER_LAYER

    adapted = export.load_adapted(result.run_dir)  # rebuilds the base with its zero biases
    assert adapted.model.config.attention_bias and adapted.model.config.mlp_bias
    assert set(adapted.meta["leaves"]) == {"/".join(path) for path in trained}
    params = traverse_util.flatten_dict(adapted.params)
    _, checkpoint, _ = models.load(model_dir)  # the bias-free checkpoint itself
    frozen = traverse_util.flatten_dict(checkpoint)
    assert set(params) == set(frozen) | set(trained)
    for path, leaf in frozen.items():
        np.testing.assert_array_equal(params[path], leaf)
    for path, leaf in trained.items():
        assert np.any(np.asarray(leaf) != 0), path  # trained away from zero
        np.testing.assert_array_equal(params[path], np.asarray(leaf))

    merged_model, merged, _ = models.load(export.merge(result.run_dir, tmp_path / "merged"))
    assert merged_model.config.attention_bias and merged_model.config.mlp_bias
    for path, leaf in traverse_util.flatten_dict(merged).items():
        np.testing.assert_array_equal(leaf, params[path])


def test_add_biases_is_refused_for_gpt2(tmp_path):
    config = models.get_config("tiny-gpt2")
    shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
    directory = save_hf(tmp_path, config, jax.tree.map(lambda s: jnp.zeros(s.shape), shapes))
    with pytest.raises(ConfigError, match="remove model.add_biases"):
        load_model(RunConfig(model=ModelConfig(name=str(directory), add_biases=True)))
