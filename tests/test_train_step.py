"""train/step.py, train/optim.py, train/method.py: the loss, accumulation, the schedule and
what each method trains (in-memory tiny models, no files)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
import models
from train import method as method_lib
from train.config import ConfigError, LoraSection, OptimConfig
from train.optim import schedule, total_steps
from train.step import init_state, loss_sum, token_losses, train_step

import tolerances as tol

B, L, V = 4, 12, 16


def batch(seed=0, rows=B):
    """Rows with a 5-token prompt, then targets, then 2 padding tokens."""
    ids = np.random.default_rng(seed).integers(1, V, (rows, L)).astype(np.int32)
    segments = np.ones((rows, L), np.int32)
    segments[:, -2:] = 0
    positions = np.broadcast_to(np.arange(L, dtype=np.int32), (rows, L)).copy()
    loss_mask = ((positions >= 5) & (segments > 0)).astype(np.int32)
    return {
        "input_ids": ids,
        "segment_ids": segments,
        "positions": positions,
        "loss_mask": loss_mask,
    }


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_token_losses_match_optax(smoothing):
    logits = jax.random.normal(jax.random.key(0), (B, L, V))
    ids = jnp.asarray(batch()["input_ids"])
    labels = optax.smooth_labels(jax.nn.one_hot(ids[:, 1:], V), smoothing)
    expected = optax.softmax_cross_entropy(logits[:, :-1], labels)
    # logsumexp − Σ y·z in float32 both ways: sums over V (exp's and the labels'), exp, log
    # and the subtraction, on magnitudes up to max |z| + the loss (tolerances.py).
    n = 2 * V + 3 * tol.ELEMENTWISE
    atol = tol.chain_atol(n, tol.scale_of(logits) + tol.scale_of(expected))
    tol.assert_close(token_losses(logits, ids, smoothing), expected, atol)
    # and the gradient, which the one-hot select (not a gather) gives in one fused pass:
    # w·(softmax − y), each term at most w in magnitude
    weights = jax.random.uniform(jax.random.key(1), (B, L - 1))
    ours = jax.grad(lambda x: (token_losses(x, ids, smoothing) * weights).sum())(logits)
    theirs = jax.grad(lambda x: (optax.softmax_cross_entropy(x[:, :-1], labels) * weights).sum())(
        logits
    )
    tol.assert_close(ours, theirs, tol.chain_atol(n, tol.scale_of(weights)))
    assert not ours[:, -1].any()  # the last position predicts nothing


def test_loss_sees_target_tokens_only():
    """Labels of prompt and padding positions can change without changing the loss."""
    logits = jax.random.normal(jax.random.key(0), (B, L, V))
    fixed = lambda *args, **kwargs: logits  # noqa: E731  (a model that ignores its input)
    data = batch()
    total, count = loss_sum(fixed, {}, data, 0.0)
    assert count == data["loss_mask"][:, 1:].sum()
    perturbed = dict(
        data,
        input_ids=np.where(data["loss_mask"] == 0, (data["input_ids"] + 3) % V, data["input_ids"]),
    )
    np.testing.assert_array_equal(loss_sum(fixed, {}, perturbed, 0.0)[0], total)
    target_changed = dict(
        data,
        input_ids=np.where(data["loss_mask"] == 1, (data["input_ids"] + 3) % V, data["input_ids"]),
    )
    assert loss_sum(fixed, {}, target_changed, 0.0)[0] != total


def test_accumulating_two_micro_batches_equals_one_double_batch():
    model = models.Decoder(models.get_config("tiny-llama"))
    base = models.init_params(model, jax.random.key(0))
    params, mask = method_lib.prepare("lora", base, LoraSection(rank=2), jax.random.key(1))
    params = jax.tree.map(lambda x: x + 0.01, params)  # B != 0, so every factor gets a gradient
    frozen, trainable = lj.split(params, mask)
    tx = optax.sgd(0.1)
    step = jax.jit(train_step(method_lib.forward("lora", model.apply, 0.0), tx, 0.0))
    halves = [batch(1), batch(2)]
    stacked = {k: np.stack([h[k] for h in halves]) for k in halves[0]}
    whole = {k: np.concatenate([h[k] for h in halves])[None] for k in halves[0]}
    state_k2, metrics_k2 = step(init_state(trainable, tx, jax.random.key(2)), frozen, stacked)
    state_k1, metrics_k1 = step(init_state(trainable, tx, jax.random.key(2)), frozen, whole)
    assert metrics_k2["target_tokens"] == metrics_k1["target_tokens"] == 2 * B * 5
    # Batches of 4 rows or 8 may sum in other orders: the loss's chain (tiny-llama over L keys
    # with rank-2 LoRA, log-softmax over its vocabulary, the sum over 2·B·L tokens) ...
    forward = tol.config_depth(model.config, keys=L, rank=2)
    loss_n = tol.train_depth(forward, model.config.vocab_size, 2 * B * L, 0)
    tol.assert_close(
        metrics_k2["loss"], metrics_k1["loss"], tol.chain_atol(loss_n, metrics_k1["loss"])
    )
    # ... and SGD's p − 0.1·g: the gradient's chain at its scale, and the update's rounding.
    grad_n = tol.train_depth(forward, model.config.vocab_size, 2 * B * L, 1)
    for a, b, p in zip(
        jax.tree.leaves(state_k2["params"]),
        jax.tree.leaves(state_k1["params"]),
        jax.tree.leaves(trainable),
        strict=True,
    ):
        g = (np.asarray(p, np.float64) - np.asarray(b, np.float64)) / 0.1
        atol = 0.1 * tol.chain_atol(grad_n, tol.scale_of(g)) + tol.dot_error(np.abs(p), 1, sides=2)
        tol.assert_close(a, b, atol)


# A float32 schedule value against its closed form: the step fraction, π·x, the cosine (an
# element-wise function), 1 + c and the halving, on values at most 1.
SCHEDULE_ATOL = tol.chain_atol(4 + tol.ELEMENTWISE, 1.0, sides=1)


def test_schedule_warms_up_then_decays_to_zero():
    for kind in ("linear", "cosine"):
        lr = schedule(OptimConfig(learning_rate=1.0, warmup_steps=4, schedule=kind), 20)
        assert [float(lr(s)) for s in (0, 2, 4)] == [0.0, 0.5, 1.0]  # s/4: exact in binary
        assert float(lr(20)) == pytest.approx(0.0, abs=SCHEDULE_ATOL)
    assert float(lr(12)) == pytest.approx(
        0.5, abs=SCHEDULE_ATOL
    )  # cosine half way through the decay
    constant = schedule(OptimConfig(learning_rate=0.3, schedule="constant"), 20)
    assert float(constant(19)) == pytest.approx(0.3, rel=tol.unit_roundoff())  # 0.3 in float32
    assert total_steps(OptimConfig(max_steps=None, epochs=3, grad_accum_steps=2), 10) == 15


def test_methods_train_what_they_say():
    gpt2 = models.init_params(models.get_config("tiny-gpt2"), jax.random.key(0))
    _, bitfit = method_lib.prepare("bitfit", gpt2, LoraSection(), jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(bitfit)[0]
    assert {path[-1].key for path, on in flat if on} == {"bias"}
    _, full = method_lib.prepare("full", gpt2, LoraSection(), jax.random.key(0))
    assert all(jax.tree.leaves(full))
    adapted, lora = method_lib.prepare("lora", gpt2, LoraSection(), jax.random.key(0))
    frozen, trainable = lj.split(adapted, lora)
    names = {path[-1].key for path, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]}
    assert names == {"kernel_lora_a", "kernel_lora_b"}
    assert jax.tree.structure(lj.combine(frozen, trainable)) == jax.tree.structure(adapted)
    llama = models.init_params(models.get_config("tiny-llama"), jax.random.key(0))
    with pytest.raises(ConfigError, match="has none.*set model.add_biases=true"):
        method_lib.prepare("bitfit", llama, LoraSection(), jax.random.key(0))
