"""data.packing=true through train/: a packed update equals the padded update of the same
examples, and a packed run trains end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import mesh as mesh_lib
from train.batching import assemble, pack_next_fit
from train.run import train
from train.setup import setup

import tolerances as tol
import train_fixtures as tf

QUIET = {"log": lambda _: None}
PACKED = ("data.packing=true", "data.max_length=96", "data.batch_size=4")  # ~3 examples a row


pytestmark = pytest.mark.usefixtures("jax_compilation_cache")


def test_a_packed_update_equals_the_padded_update_of_the_same_examples(run_files):
    """One jitted step of the run (LoRA forward, loss, AdamW) on 12 examples, one per row or
    packed three to a row: same token counts, and loss and gradient norm within float32
    rounding (tolerances.train_depth)."""
    model_dir, csv, root = run_files
    s = setup(tf.tiny_config(model_dir, csv, root / "unused", *PACKED), **QUIET)
    examples = s.splits.train[:12]
    lengths_N = np.array([len(e.ids_L) for e in examples])
    rows = pack_next_fit(lengths_N, range(len(examples)), s.cfg.data.max_length)
    assert len(rows) < len(examples) // 2  # packing really packs
    layouts = {
        "padded": [[e] for e in examples],
        "packed": [[examples[i] for i in row] for row in rows],
    }
    metrics = {}
    for name, layout in layouts.items():
        batch = assemble(layout, s.cfg.data.max_length, s.splits.pad_id)
        batch_1xBxL = mesh_lib.put_batch({k: v[None] for k, v in batch.items()}, s.mesh)
        state = jax.tree.map(jnp.copy, s.state)  # the step donates its state
        metrics[name] = {k: float(v) for k, v in s.step_fn(state, s.frozen, batch_1xBxL)[1].items()}
    padded, packed = metrics["padded"], metrics["packed"]
    assert packed["tokens"] == padded["tokens"] == lengths_N.sum()
    assert packed["target_tokens"] == padded["target_tokens"]
    # The tiny Llama over 96 keys, rank-4 LoRA; the gradient's norm sums over every factor.
    forward = tol.decoder_depth(
        layers=tf.LAYERS,
        hidden=tf.HIDDEN,
        mlp=tf.MLP,
        head_dim=tf.HEAD_DIM,
        keys=s.cfg.data.max_length,
        rank=4,
    )
    tokens = int(lengths_N.sum())
    factors = sum(x.size for x in jax.tree.leaves(s.state["params"]))
    loss_n = tol.train_depth(forward, tf.VOCAB, tokens, 0)
    norm_n = tol.train_depth(forward, tf.VOCAB, tokens, 1) + factors
    tol.assert_close(packed["loss"], padded["loss"], tol.chain_atol(loss_n, padded["loss"]))
    tol.assert_close(
        packed["grad_norm"], padded["grad_norm"], tol.chain_atol(norm_n, padded["grad_norm"])
    )


def test_a_packed_run_trains_end_to_end(run_files):
    model_dir, csv, root = run_files
    result = train(tf.tiny_config(model_dir, csv, root / "packed", *PACKED), **QUIET)
    assert result.step == 6 and (root / "packed" / "adapter" / "adapter.json").is_file()
    before, after = result.validation_before["loss"], result.validation_after["loss"]
    assert np.isfinite(after) and after < before
