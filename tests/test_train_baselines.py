"""The LoRA paper's baselines as methods of the pipeline: FT-Top2 (``method=ft_top2``),
AdapterH (``adapter_h``, Houlsby et al. 2019) and AdapterL (``adapter_l``, Lin et al. 2020).

Checked against the paper's definitions: FT-Top2's mask against the blocks a model config
has; the adapters' trainable counts against their closed forms; their forward against a
second code path built from Flax's stock ``nn.Dense`` / ``nn.LayerNorm`` layers on the
paper's formula; and each method end to end through ``train`` (3 updates), its adapter
directory loaded back and decoded with the adapters on as ``lora-jax eval`` does."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import models
from models.layers import MLP, Attention
from studies.e2e import evaluation
from studies.e2e.decoding import Decoding
from train import adapters, export
from train import method as method_lib
from train.adapter import AdapterError
from train.config import AdapterSection, ConfigError, LoraSection
from train.run import train

import tolerances as tol
import train_fixtures as tf

pytestmark = pytest.mark.usefixtures("jax_compilation_cache")

BOTTLENECK = 3


def llama(layers: int = 2, scan: bool = False, shapes: bool = False) -> tuple[models.Decoder, dict]:
    """The tiny Llama preset with ``layers`` layers, and its random params (or their shapes)."""
    config = dataclasses.replace(
        models.get_config("tiny-llama"), num_layers=layers, scan_layers=scan
    )
    init = functools.partial(models.init_params, config, jax.random.key(0))
    return models.Decoder(config), jax.eval_shape(init) if shapes else jax.jit(init)()


def adapter_count(design: str, D: int, m: int, layers: int) -> int:
    """The papers' adapter: down (D·m + m) and up (m·D + D) per adapted sublayer; Houlsby's
    after attention and MLP (2 per layer), Lin et al.'s after the MLP with a LayerNorm's
    scale and bias (2·D)."""
    bottleneck = D * m + m + m * D + D
    return layers * (2 * bottleneck if design == "adapter_h" else bottleneck + 2 * D)


def test_ft_top2_trains_exactly_the_last_two_blocks():
    model, params = llama(layers=4, shapes=True)
    c = model.config
    mask = method_lib.MASKS["ft_top2"](params)
    chosen = {p for p, on in lj.flatten_paths(mask).items() if on}
    last_two = {p for p in lj.flatten_paths(params) if p.split("/")[0] in ("layers_2", "layers_3")}
    assert chosen == last_two
    # a Llama block: q, o (D x H·hd), k, v (D x K·hd), gate, up, down (D x F), two norms (D)
    D, F = c.hidden_size, c.intermediate_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_block = 2 * D * q + 2 * D * kv + 3 * D * F + 2 * D
    _, trainable = lj.split(params, mask)
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(trainable)) == 2 * per_block
    # the trainable half alone (lj.optimizer applies the mask to it) is all trainable
    assert all(jax.tree.leaves(method_lib.MASKS["ft_top2"](trainable)))


def test_ft_top2_refuses_scanned_layers():
    _, params = llama(layers=4, scan=True, shapes=True)
    with pytest.raises(ConfigError, match="set model.scan_layers=false"):
        method_lib.prepared_shapes("ft_top2", params, LoraSection())


@pytest.mark.parametrize("design", ["adapter_h", "adapter_l"])
def test_adapters_start_as_the_base_and_count_as_the_papers(design):
    model, base = llama()
    params, mask = method_lib.prepare(
        design, base, LoraSection(), jax.random.key(1), adapter=AdapterSection(BOTTLENECK)
    )
    frozen, trainable = lj.split(params, mask)
    assert jax.tree.map(np.shape, frozen) == jax.tree.map(np.shape, base)
    c = model.config
    expected = adapter_count(design, c.hidden_size, BOTTLENECK, c.num_layers)
    assert sum(x.size for x in jax.tree.leaves(trainable)) == expected
    assert adapters.parameter_count(design, c.hidden_size, c.num_layers, BOTTLENECK) == expected
    # scanned layers: the same count, stacked along the layer axis
    _, stacked = llama(scan=True, shapes=True)
    shapes, mask = method_lib.prepared_shapes(
        design, stacked, LoraSection(), adapter=AdapterSection(BOTTLENECK)
    )
    _, trainable = lj.split(shapes, mask)
    assert all(x.shape[0] == c.num_layers for x in jax.tree.leaves(trainable))
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(trainable)) == expected
    tokens_1xL = np.arange(1, 12, dtype=np.int32)[None]
    forward = method_lib.forward(design, model.apply, dropout=0.0)
    # up = 0: h + act(down(h))·0 + 0 is h in any float arithmetic (run op by op: one jitted
    # program per forward could fuse the base's operations differently)
    np.testing.assert_array_equal(
        forward({"params": params}, tokens_1xL), model.apply({"params": base}, tokens_1xL)
    )


class PaperAdapter(nn.Module):
    """The second code path: the papers' adapter from Flax's stock layers,
    h + up(act(down(h'))), h' = h (Houlsby, GELU) or LayerNorm(h) (Lin et al., ReLU)."""

    design: str
    eps: float

    @nn.compact
    def __call__(self, h):
        x = nn.LayerNorm(epsilon=self.eps, name="norm")(h) if self.design == "adapter_l" else h
        act = (
            nn.relu if self.design == "adapter_l" else functools.partial(nn.gelu, approximate=True)
        )
        m = self.variables["params"]["down"]["kernel"].shape[-1]
        return h + nn.Dense(h.shape[-1], name="up")(act(nn.Dense(m, name="down")(x)))


def paper_apply(fn, design):
    """``fn`` with :class:`PaperAdapter` on the outputs of the sublayers ``design`` adapts."""
    where = (Attention, MLP) if design == "adapter_h" else (MLP,)

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(context.module, where):
            return out
        return PaperAdapter(design, context.module.config.norm_eps, name="adapter")(out)

    def adapted(*args, **kwargs):
        with nn.intercept_methods(interceptor):
            return fn(*args, **kwargs)

    return adapted


@pytest.mark.parametrize(("design", "scan"), [("adapter_h", False), ("adapter_l", True)])
def test_adapters_compute_the_papers_formula(design, scan):
    model, base = llama(scan=scan)
    params = adapters.init(jax.random.key(1), base, design, BOTTLENECK)
    # every adapter leaf random (up non-zero, a LayerNorm scale away from one)
    keys = iter(jax.random.split(jax.random.key(2), 64))
    params = lj.unflatten_paths(
        {
            p: x + 0.3 * jax.random.normal(next(keys), x.shape) if "/adapter/" in p else x
            for p, x in lj.flatten_paths(params).items()
        }
    )
    tokens_1xL = np.arange(1, 12, dtype=np.int32)[None]
    ours = jax.jit(method_lib.forward(design, model.apply, dropout=0.0))(
        {"params": params}, tokens_1xL
    )
    paper = jax.jit(paper_apply(model.apply, design))({"params": params}, tokens_1xL)
    base_logits = jax.jit(model.apply)({"params": base}, tokens_1xL)
    c = model.config
    # The decoder's chain (tol.config_depth) plus, per layer, two adapters on the path,
    # each a LayerNorm (mean and variance passes: 2·D), down (D), up (m) and a few
    # element-wise functions (residual add, activation, rsqrt); two float32 evaluations.
    per_adapter = 2 * c.hidden_size + c.hidden_size + BOTTLENECK + 4 * tol.ELEMENTWISE
    depth = tol.config_depth(c, keys=tokens_1xL.shape[1]) + c.num_layers * 2 * per_adapter
    atol = tol.chain_atol(depth, tol.scale_of(paper))
    np.testing.assert_allclose(ours, paper, rtol=0, atol=atol)
    assert float(jnp.abs(ours - base_logits).max()) > 100 * atol  # the adapters do act


def _run(run_files, name, *overrides):
    model_dir, csv, root = run_files
    cfg = tf.tiny_config(
        model_dir,
        csv,
        root / name,
        f"method={name}",
        "optim.max_steps=3",
        "checkpoint.every_steps=0",
        "data.validation_fraction=0",  # no eval step to compile
        *overrides,
    )
    return cfg, train(cfg, **tf.QUIET)


@pytest.fixture(scope="module")
def adapter_runs(run_files):
    """design -> (config, result) of a 3-update run, trained on first use."""
    runs = {}

    def run(design):
        if design not in runs:
            runs[design] = _run(run_files, design, f"adapter.bottleneck={BOTTLENECK}")
        return runs[design]

    return run


def test_ft_top2_trains_end_to_end(run_files):
    cfg, result = _run(run_files, "ft_top2")
    _, base, _ = models.load(cfg.model.name)
    trained = lj.flatten_paths(result.state["params"])
    assert {p.split("/")[0] for p in trained} == {"layers_0", "layers_1"}  # tf.LAYERS = 2
    moments = [x for x in jax.tree.leaves(result.state["opt_state"]) if np.ndim(x)]
    assert sum(np.size(x) for x in moments) == 2 * sum(np.size(x) for x in trained.values())
    adapted = export.load_adapted(result.run_dir)
    assert set(adapted.meta["leaves"]) == set(trained)
    loaded = lj.flatten_paths(adapted.params)
    assert set(loaded) == set(lj.flatten_paths(base))
    for path, leaf in lj.flatten_paths(base).items():
        expected = trained.get(path, leaf)
        np.testing.assert_array_equal(loaded[path], np.asarray(expected))
        assert (path in trained) == bool(np.any(np.asarray(expected) != np.asarray(leaf)))


@pytest.mark.parametrize("design", ["adapter_h", "adapter_l"])
def test_adapters_train_end_to_end(adapter_runs, design):
    cfg, result = adapter_runs(design)
    model, base, _ = models.load(cfg.model.name)
    trained = lj.flatten_paths(result.state["params"])
    c = model.config
    expected = adapter_count(design, c.hidden_size, BOTTLENECK, c.num_layers)
    assert sum(x.size for x in trained.values()) == expected
    assert all("/adapter/" in p for p in trained)
    # the optimizer holds AdamW's two moments of the adapters and nothing of the base
    moments = [x for x in jax.tree.leaves(result.state["opt_state"]) if np.ndim(x)]
    assert sum(np.size(x) for x in moments) == 2 * expected
    # 3 updates move every adapter leaf (down's gradient is zero only while up = 0)
    initial, _ = method_lib.prepare(
        design, base, cfg.lora, method_lib.init_keys(cfg), adapter=cfg.adapter
    )
    for path, leaf in lj.flatten_paths(initial).items():
        if path in trained:
            assert np.any(np.asarray(trained[path]) != np.asarray(leaf)), path
    # the adapter directory holds exactly the adapters; loaded, the base is unchanged
    adapted = export.load_adapted(result.run_dir)
    assert set(adapted.meta["leaves"]) == set(trained)
    loaded = lj.flatten_paths(adapted.params)
    assert set(loaded) == set(lj.flatten_paths(base)) | set(trained)
    for path, leaf in lj.flatten_paths(base).items():
        np.testing.assert_array_equal(loaded[path], leaf)
    for path, leaf in trained.items():
        np.testing.assert_array_equal(loaded[path], np.asarray(leaf))
    # extra layers: merging or exporting them as LoRA is refused in one line, nothing written
    out = result.run_dir.parent / f"merged_{design}"
    with pytest.raises(AdapterError, match="bottleneck adapters are extra layers") as refused:
        export.merge(result.run_dir, out)
    assert "\n" not in str(refused.value) and not out.exists()


def test_eval_decodes_with_the_adapters(adapter_runs):
    """``lora-jax eval`` of an adapter_h run (attention and MLP adapters, the KV-cached
    attention included) decodes with the adapters on."""
    _, result = adapter_runs("adapter_h")
    target = evaluation.load_target(result.run_dir)
    # Planted adapters (every adapter leaf random) make the tokens differ from the base's.
    keys = iter(jax.random.split(jax.random.key(3), 64))
    planted = lj.unflatten_paths(
        {
            p: x + 0.5 * jax.random.normal(next(keys), x.shape) if "/adapter/" in p else x
            for p, x in lj.flatten_paths(target.params).items()
        }
    )
    target = target._replace(params=planted)
    greedy = Decoding(num_beams=1, no_repeat_ngram_size=0, max_new_tokens=6)
    mrs = [mr for mr, _ in tf.e2e_rows()[:6:3]]
    with_adapters = evaluation.decode(target, mrs, greedy)
    assert with_adapters != evaluation.decode(target._replace(apply_fn=None), mrs, greedy)
    # generate's tokens (KV cache) are the greedy tokens of the adapted full forward
    forward = method_lib.forward("adapter_h", target.model.apply, dropout=0.0)
    prompt_1xP = np.arange(1, 9, dtype=np.int32)[None]
    tokens = models.generate(
        target.model,
        planted,
        prompt_1xP,
        max_new_tokens=6,
        eos_token_id=-1,
        apply_fn=target.apply_fn,
    )
    np.testing.assert_array_equal(
        tokens, tf.greedy_by_full_forwards(forward, planted, prompt_1xP, 6)
    )
