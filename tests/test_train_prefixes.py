"""The LoRA paper's prefix baselines as methods of the pipeline (train/prefixes.py):
PreEmbed (``method=pre_embed``: trainable embeddings of P positions before the tokens)
and PreLayer (``pre_layer``: every block's input at those positions trainable).

Checked against the paper's definitions: the trainable counts against its closed forms
(d_model·l_p and L·d_model·l_p); the forward against a second code path, the plain
model on a prompt of P real tokens: a new prefix (PreEmbed: those tokens' embeddings;
PreLayer: the base's activations for them at every block's input, Li & Liang's
initialisation) must give the prompted model's logits; decoding with a KV cache
(greedy, beams, padded rows) against the prompted model's; each method end to end
through ``train`` (3 updates), its directory loaded back and decoded as ``lora-jax eval``
does, and merging refused."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import lora_jax as lj
import models
from studies.e2e import evaluation
from studies.e2e.decoding import Decoding
from train import export, prefixes
from train import method as method_lib
from train.adapter import AdapterError
from train.config import ConfigError, LoraSection, PrefixSection
from train.run import train

import tolerances as tol
import train_fixtures as tf

pytestmark = pytest.mark.usefixtures("jax_compilation_cache")

P = 3  # prefix positions
DESIGNS = ("pre_embed", "pre_layer")


def llama(layers: int = 2, scan: bool = False) -> tuple[models.Decoder, dict]:
    """The tiny Llama preset with ``layers`` layers and its random params."""
    config = dataclasses.replace(
        models.get_config("tiny-llama"), num_layers=layers, scan_layers=scan
    )
    return models.Decoder(config), jax.jit(models.init_params, static_argnums=0)(
        config, jax.random.key(0)
    )


def prompted(design: str, model, base) -> tuple[dict, np.ndarray]:
    """(``base`` with the prefix ``prefixes.init`` gives it, the P tokens t it drew): the
    adapted model should start as the base prompted with t."""
    key = jax.random.key(4)
    params = prefixes.init(key, base, design, P, model)
    return params, np.asarray(prefixes.prefix_ids(key, model.config.vocab_size, P))[None]


@pytest.mark.parametrize("design", DESIGNS)
def test_prefixes_count_as_the_papers(design):
    model, base = llama(layers=3)
    c = model.config
    params, mask = method_lib.prepare(
        design, base, LoraSection(), jax.random.key(1), prefix=PrefixSection(P), model=model
    )
    frozen, trainable = lj.split(params, mask)
    assert jax.tree.map(np.shape, frozen) == jax.tree.map(np.shape, base)
    # the paper's |Θ| with no infix: d_model·l_p (PreEmbed), L·d_model·l_p (PreLayer)
    expected = c.hidden_size * P * (c.num_layers if design == "pre_layer" else 1)
    assert sum(x.size for x in jax.tree.leaves(trainable)) == expected
    assert prefixes.parameter_count(design, c.hidden_size, c.num_layers, P) == expected
    # scanned layers: the same count, stacked along the layer axis
    scanned, stacked = llama(layers=3, scan=True)
    shapes, mask = method_lib.prepared_shapes(
        design, stacked, LoraSection(), prefix=PrefixSection(P), model=scanned
    )
    _, trainable = lj.split(shapes, mask)
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(trainable)) == expected


@pytest.mark.parametrize(
    ("design", "scan"), [("pre_embed", True), ("pre_layer", False), ("pre_layer", True)]
)
def test_a_new_prefix_is_a_prompt_of_real_tokens(design, scan):
    """The forward with a new prefix (prefixes.init: the embeddings of tokens t, or the
    base's activations for them at every block) gives the logits the plain model gives
    the tokens after the prompt t, in both call forms: positions and segment ids
    (training, with a padded row) and the defaults."""
    model, base = llama(scan=scan)
    params, ids_1xP = prompted(design, model, base)
    forward = method_lib.forward(design, model.apply, dropout=0.0)
    tokens_BxL = np.array([[7, 8, 9, 10, 11, 12], [3, 4, 5, 0, 0, 0]], np.int32)
    segments_BxL = np.array([[1] * 6, [1, 1, 1, 0, 0, 0]], np.int32)
    positions_BxL = np.broadcast_to(np.arange(6, dtype=np.int32), (2, 6))
    got = forward({"params": params}, tokens_BxL, positions=positions_BxL, segment_ids=segments_BxL)
    full_BxT = np.concatenate([np.repeat(ids_1xP, 2, 0), tokens_BxL], axis=1)
    want = model.apply(
        {"params": base},
        full_BxT,
        positions=np.broadcast_to(np.arange(P + 6, dtype=np.int32), (2, P + 6)),
        segment_ids=np.concatenate([np.ones((2, P), np.int32), segments_BxL], axis=1),
    )[:, P:]
    # the same operations on the same values, but the prefix arrives by another route (for
    # pre_layer through a trace of the unrolled base): float32 chains over P + 6 keys
    atol = tol.logits_atol(model.config, want, keys=P + 6)
    real = segments_BxL > 0
    tol.assert_close(np.asarray(got)[real], np.asarray(want)[real], atol, design)
    tol.assert_close(
        forward({"params": params}, tokens_BxL[:1]),
        model.apply({"params": base}, full_BxT[:1])[:, P:],
        atol,
        f"{design}, default positions",
    )


@pytest.mark.parametrize("design", DESIGNS)
def test_decoding_with_a_prefix_is_decoding_the_prompted_model(design):
    """models.generate with the prefix's apply (its KV cache grown by P slots on the
    first call) decodes as the plain model does with the prompt t before each prompt:
    greedy and beam search (the cache reordered), rows padded to a common length."""
    model, base = llama(scan=True)
    params, ids_1xP = prompted(design, model, base)
    apply_fn = method_lib.decoding_apply(design, model.apply)
    prompts = np.array([[0, 0, 9, 4, 6], [3, 1, 8, 2, 7]], np.int32)
    mask = prompts > 0
    with_t = np.concatenate([np.repeat(ids_1xP, 2, 0), prompts], axis=1)
    with_t_mask = np.concatenate([np.ones((2, P), bool), mask], axis=1)
    for beams in (1, 2):
        settings = dict(max_new_tokens=5, eos_token_id=-1, num_beams=beams)
        got = models.generate(
            model, params, prompts, attention_mask=mask, apply_fn=apply_fn, **settings
        )
        want = models.generate(model, base, with_t, attention_mask=with_t_mask, **settings)
        np.testing.assert_array_equal(got, want, err_msg=f"{design}, {beams} beam(s)")


def test_packing_is_refused_with_a_prefix(run_files):
    model_dir, csv, root = run_files
    with pytest.raises(ConfigError, match="set data.packing=false") as refused:
        tf.tiny_config(model_dir, csv, root / "packed", "method=pre_layer", "data.packing=true")
    assert "\n" not in str(refused.value)


@pytest.fixture(scope="module")
def prefix_runs(run_files):
    """design -> (config, result) of a 3-update run, trained on first use."""
    runs = {}

    def run(design):
        if design not in runs:
            model_dir, csv, root = run_files
            cfg = tf.tiny_config(
                model_dir,
                csv,
                root / design,
                f"method={design}",
                f"prefix.length={P}",
                "optim.max_steps=3",
                "optim.learning_rate=1e-2",
                "checkpoint.every_steps=0",
                "data.validation_fraction=0",
            )
            runs[design] = cfg, train(cfg, **tf.QUIET)
        return runs[design]

    return run


@pytest.mark.parametrize("design", DESIGNS)
def test_prefixes_train_end_to_end(prefix_runs, design):
    cfg, result = prefix_runs(design)
    model, base, _ = models.load(cfg.model.name)
    c = model.config
    trained = lj.flatten_paths(result.state["params"])
    expected = prefixes.parameter_count(design, c.hidden_size, c.num_layers, P)
    assert all(p.endswith("/prefix") for p in trained)
    assert sum(x.size for x in trained.values()) == expected
    moments = [x for x in jax.tree.leaves(result.state["opt_state"]) if np.ndim(x)]
    assert sum(np.size(x) for x in moments) == 2 * expected  # AdamW's two, nothing of the base
    initial, _ = method_lib.prepare(
        design, base, cfg.lora, method_lib.init_keys(cfg), prefix=cfg.prefix, model=model
    )
    for path, leaf in lj.flatten_paths(initial).items():
        if path in trained:  # 3 updates move the prefix
            assert np.any(np.asarray(trained[path]) != np.asarray(leaf)), path
    adapted = export.load_adapted(result.run_dir)
    loaded = lj.flatten_paths(adapted.params)
    assert set(loaded) == set(lj.flatten_paths(base)) | set(trained)
    for path, leaf in trained.items():
        np.testing.assert_array_equal(loaded[path], np.asarray(leaf))
    out = result.run_dir.parent / f"merged_{design}"
    with pytest.raises(AdapterError, match="a prefix is extra positions") as refused:
        export.merge(result.run_dir, out)
    assert "\n" not in str(refused.value) and not out.exists()


def test_eval_decodes_with_the_prefix(prefix_runs):
    """``lora-jax eval`` of a pre_layer run decodes with the prefix: a planted prefix
    changes the tokens, and they are the greedy tokens of full forwards with it."""
    _, result = prefix_runs("pre_layer")
    target = evaluation.load_target(result.run_dir)
    keys = iter(jax.random.split(jax.random.key(3), 64))
    planted = lj.unflatten_paths(
        {
            p: x + 2.0 * jax.random.normal(next(keys), x.shape) if p.endswith("/prefix") else x
            for p, x in lj.flatten_paths(target.params).items()
        }
    )
    target = target._replace(params=planted)
    greedy = Decoding(num_beams=1, no_repeat_ngram_size=0, max_new_tokens=6)
    mrs = [mr for mr, _ in tf.e2e_rows()[:6:3]]
    assert evaluation.decode(target, mrs, greedy) != evaluation.decode(
        target._replace(apply_fn=None), mrs, greedy
    )
    forward = method_lib.forward("pre_layer", target.model.apply, 0.0)
    prompt_1xL = np.arange(1, 9, dtype=np.int32)[None]
    tokens = models.generate(
        target.model,
        planted,
        prompt_1xL,
        max_new_tokens=6,
        eos_token_id=-1,
        apply_fn=target.apply_fn,
    )
    np.testing.assert_array_equal(
        tokens, tf.greedy_by_full_forwards(forward, planted, prompt_1xL, 6)
    )
