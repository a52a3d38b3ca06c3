"""Fixtures shared by the training-pipeline tests (tiny model, tiny data, compile cache)."""

import pytest

import train_fixtures as tf


@pytest.fixture(scope="module")
def jax_compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache for one test module (see tf.compilation_cache);
    yields its directory, for processes a test starts."""
    directory = tmp_path_factory.getbasetemp() / "jax_cache"
    with tf.compilation_cache(directory):
        yield directory


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """(tiny Llama checkpoint dir, E2E-format CSV, a scratch root) for one test module."""
    root = tmp_path_factory.mktemp("run")
    return tf.write_tiny_llama(root / "model"), tf.write_csv(root / "e2e.csv"), root
