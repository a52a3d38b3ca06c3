"""What trains: ``method: lora | full | bitfit | ft_top2 | adapter_h | adapter_l |
pre_embed | pre_layer`` as a trainable mask over the parameter tree.

* ``lora``: ``lj.init`` adds the factors A, B (and bias deltas for ``lora.bias``) beside
  the target weights; the mask is ``lj.trainable_mask`` (A, B, deltas).
* ``full``: every parameter.
* ``bitfit`` (Ben Zaken et al. 2021): every leaf named ``bias`` (``lj.bias_mask``), the
  base's own biases trained in place. Not ``lj.init(bias="all")``: that adds bias *deltas*
  beside LoRA factors and needs targets, while BitFit has no factors at all. Llama-family
  models have no biases: load them with ``model.add_biases=true`` (zero biases on every
  attention and MLP projection, Hugging Face's ``attention_bias``/``mlp_bias``), else
  BitFit is refused.
* ``ft_top2`` (Li & Liang 2021's FT-Top2, a baseline of the LoRA paper): every leaf of the
  last two transformer blocks (``layers_<N-2>``, ``layers_<N-1>``); the embeddings, the
  final norm and the head stay frozen. With ``model.scan_layers=true`` the blocks are one
  stacked leaf per weight, which a per-leaf mask cannot cut: refused, naming the fix.
* ``adapter_h`` / ``adapter_l`` (Houlsby et al. 2019 / Lin et al. 2020, the paper's
  AdapterH / AdapterL): train/adapters.py adds bottleneck adapters (``adapter.bottleneck``)
  beside the base's params, and only they train; the forward runs them
  (:func:`forward`, :func:`decoding_apply`).
* ``pre_embed`` / ``pre_layer`` (Li & Liang 2021's prefix tuning, the paper's PreEmbed /
  PreLayer): train/prefixes.py adds ``prefix.length`` trainable positions before every
  row, their embeddings or every block's input there, and only they train; the forward
  runs them (:func:`forward`, :func:`decoding_apply`).

Each mask is a function of the tree's paths only (:data:`MASKS`), so it fits both the
whole tree and the trainable half ``lj.split`` cuts with it: train/run.py gives it to
``lj.optimizer`` with that half.

:func:`check_targets` checks the ``lora`` section against the model before anything is
loaded: every regex compiles, every ``lora.targets`` regex matches a weight of the model,
every ``rank_pattern``/``alpha_pattern`` key matches an adapted weight, and ``lj.init``
accepts the lot (ranks that fit, ...), all on the model's abstract parameter tree
(``models.abstract_load``: shapes from the checkpoint's config, no weights read).

The train step differentiates only the trainable half of ``lj.split(params, mask)`` (the
optimizer sees nothing else, so frozen weights get no gradient, no update and no
optimizer state) and rebuilds the full tree with ``lj.combine``, which also checks
that every LoRA factor fits its weight.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import lora_jax as lj
import models
from train import adapters as bottleneck
from train import prefixes
from train.config import (
    ADDED_BIASES,
    AdapterSection,
    ConfigError,
    LoraSection,
    PrefixSection,
    RunConfig,
)

TARGETS_EXAMPLE = "lora.targets=['.*/(q_proj|v_proj)/kernel']"

TOP_LAYERS = 2  # the blocks ft_top2 trains
LAYER = re.compile(r"^layers_(\d+)/")


def top_layers_mask(params: Any) -> Any:
    """True on every leaf of the last :data:`TOP_LAYERS` blocks (``layers_<i>/...``, i >=
    N - 2, N the blocks in ``params``). Raises ConfigError for scanned layers (``layers/``)."""
    flat = lj.flatten_paths(params)
    if any(p.startswith("layers/") for p in flat):
        raise ConfigError(
            "method=ft_top2 trains the last two layers, but with model.scan_layers=true "
            "the layers are stacked into one array per weight and a mask selects whole "
            "arrays; set model.scan_layers=false"
        )
    layer = {p: int(m.group(1)) for p in flat if (m := LAYER.match(p))}
    first = max(layer.values(), default=-1) + 1 - TOP_LAYERS
    return lj.unflatten_paths({p: layer.get(p, -1) >= first for p in flat}, like=params)


# method -> its trainable mask, a function of a parameter tree (of its paths only)
MASKS: dict[str, Callable[[Any], Any]] = {
    "lora": lj.trainable_mask,
    "full": lambda params: jax.tree.map(lambda _: True, params),
    "bitfit": lj.bias_mask,
    "ft_top2": top_layers_mask,
    "adapter_h": bottleneck.trainable_mask,
    "adapter_l": bottleneck.trainable_mask,
    "pre_embed": prefixes.trainable_mask,
    "pre_layer": prefixes.trainable_mask,
}


# fields of the ``lora`` section that say how many adapters train, not what one adapter is
ADAPTER_COUNT_FIELDS = ("num_adapters", "init_seeds")


def lora_config(section: LoraSection) -> lj.LoraConfig:
    """The ``lj.LoraConfig`` of a config's ``lora`` section (the config of each adapter)."""
    fields = dataclasses.asdict(section)
    for name in ADAPTER_COUNT_FIELDS:
        fields.pop(name)
    return lj.LoraConfig(**fields)


def init_seeds(cfg: RunConfig) -> tuple[int, ...]:
    """Each adapter's init seed: ``lora.init_seeds``, else ``seed + j`` for adapter j."""
    return cfg.lora.init_seeds or tuple(cfg.seed + j for j in range(cfg.lora.num_adapters))


def init_keys(cfg: RunConfig) -> jax.Array:
    """The key of each adapter's initial factors: a run draws its adapter with the first
    half of ``jax.random.split(key(seed))``; with ``lora.num_adapters = k`` adapter j is
    drawn as a run of seed ``init_seeds(cfg)[j]`` draws its one (so it is the adapter of
    the run with ``seed`` = that seed, or with ``lora.init_seeds`` = [that seed]). One key
    for k = 1, else k keys (shape (k,)). Dropout and data order follow ``seed``."""
    keys = [jax.random.split(jax.random.key(s))[0] for s in init_seeds(cfg)]
    return keys[0] if len(keys) == 1 else jnp.stack(keys)


FROZEN_BF16_AT = 10**9  # base parameters from which "auto" stores a frozen base in bfloat16


def model_options(cfg: RunConfig) -> dict[str, Any]:
    """The ``models.load`` / ``models.abstract_load`` options of a config's ``model`` section:
    numerics (``param_dtype="auto"`` resolved by :func:`resolve`), layer scan, remat, the
    attention kernel and the biases ``model.add_biases`` adds."""
    model = resolve(cfg).model
    return dict(
        dtype=model.dtype,
        param_dtype=model.param_dtype,
        scan_layers=model.scan_layers,
        remat_policy=model.remat,
        attention=model.attention,
        **(ADDED_BIASES if model.add_biases else {}),
    )


def resolve(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``model.param_dtype="auto"`` made concrete: bfloat16 when the method
    freezes the base's weights (lora, bitfit, the adapters) and the base has >= 1B
    parameters (its factors, biases, adapters and optimizer state stay float32: ``lj.init``
    makes factors float32), else float32 (full and ft_top2 train base weights).
    Only the model's config is read (``models.abstract_load``) to count its parameters."""
    if cfg.model.param_dtype != "auto":
        return cfg
    trains_base = cfg.method in ("full", "ft_top2")  # float32 master weights
    frozen_large = not trains_base and _base_parameters(cfg.model.name) >= FROZEN_BF16_AT
    dtype = "bfloat16" if frozen_large else "float32"
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, param_dtype=dtype))


@functools.lru_cache(maxsize=16)
def _base_parameters(name: str) -> int:
    """Elements of the base ``name``, from its config (kept: a run resolves its config in
    check_targets, model_options and setup)."""
    _, shapes = models.abstract_load(name)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def check_targets(cfg: RunConfig) -> None:
    """Raise ConfigError (one line naming the key, the regex and the fix) when the ``lora``
    section cannot adapt ``cfg.model``: a regex of ``lora.targets``, ``lora.rank_pattern`` or
    ``lora.alpha_pattern`` that does not compile; a target regex that matches no weight (a
    leaf with two or more axes) of the model, or a pattern key that matches none of the
    weights the targets adapt (the message shows some of the model's weight paths); or
    anything else ``lj.init`` would refuse (a rank larger than a weight allows).

    Only the model's config is read (``models.abstract_load``); nothing is checked unless
    ``method`` is ``lora``. Errors of the model itself (an unknown name, an unsupported
    config) are raised as ``models.load`` raises them.
    """
    if cfg.method != "lora":
        return
    lora = cfg.lora
    for pattern in lora.targets:
        _compile(pattern, "lora.targets", f"a regex over parameter paths, e.g. {TARGETS_EXAMPLE}")
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(lora, key) or {}:
            _compile(
                pattern,
                f"lora.{key}",
                "a regex matching a path or its trailing segments, "
                f"e.g. 'lora.{key}={{q_proj: 4}}'",
            )
    try:
        config = lora_config(lora)
    except ValueError as e:
        raise ConfigError(f"lora: {_one_line(e)}") from None
    _, shapes = models.abstract_load(cfg.model.name, **model_options(cfg))
    weights = [
        path
        for path, leaf in lj.flatten_paths(shapes).items()
        if len(leaf.shape) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    for pattern in lora.targets:
        if not any(re.search(pattern, path) for path in weights):
            raise ConfigError(
                f"lora.targets: {pattern!r} matches no weight of model "
                f"{cfg.model.name!r}; the regex is searched in slash-joined "
                f"parameter paths, and only leaves with two or more axes (kernels, "
                f"embeddings) can be adapted; the model's weights are "
                f"{_examples(weights)}; e.g. {TARGETS_EXAMPLE}"
            )
    adapted = [path for path in weights if config.is_target(path)]
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(lora, key) or {}:
            probe = lj.LoraConfig(rank=1, alpha=1.0, targets=".", rank_pattern={pattern: 2})
            if not any(probe.rank_for(path) == 2 for path in adapted):  # lj's matching rule
                raise ConfigError(
                    f"lora.{key}: key {pattern!r} matches none of the weights that "
                    f"lora.targets adapts ({_examples(adapted)}); a key matches a "
                    f"whole path or its trailing segments, e.g. 'q_proj'"
                )
    try:
        jax.eval_shape(lambda key, params: lj.init(key, params, config), jax.random.key(0), shapes)
    except ValueError as e:
        raise ConfigError(f"lora: {_one_line(e)}") from None


def _compile(pattern: str, key: str, fix: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{key}: {pattern!r} is not a valid regex ({e}); give {fix}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _examples(paths: Sequence[str], shown: int = 12) -> str:
    """Some of ``paths``, those of every layer shown once as ``layers_0``'s, on one line."""
    distinct = list(dict.fromkeys(re.sub(r"(^|/)layers_\d+/", r"\1layers_0/", p) for p in paths))
    more = f", ... ({len(distinct) - shown} more)" if len(distinct) > shown else ""
    alike = " (every layers_N alike)" if len(distinct) < len(paths) else ""
    return f"{', '.join(distinct[:shown])}{more}{alike}" if paths else "none"


def prepare(
    method: str,
    params: Any,
    lora: LoraSection,
    key: jax.Array,
    quantize: str = "none",
    adapter: AdapterSection = AdapterSection(),
    prefix: PrefixSection = PrefixSection(),
    model: models.Decoder | None = None,
) -> tuple[Any, Any]:
    """(params to train from, trainable mask): adapted params for LoRA, the base with
    bottleneck adapters (``adapter``: m) beside it for adapter_h / adapter_l, with a prefix
    (``prefix``: its length; pre_layer's starts from ``model``'s activations) for
    pre_embed / pre_layer, else ``params``.

    With ``quantize`` (``model.quantize``: ``"int8"`` or ``"nf4"``) every kernel LoRA
    adapts is then stored quantized (``lj.quantize``, after ``lj.init`` so that DoRA's
    magnitudes and PiSSA's residual come from the full-precision W); it stays frozen.

    With ``lora.num_adapters = k > 1``, ``key`` holds k keys (:func:`init_keys`) and the
    params hold a bank (``lj.stack``) of the k adapters ``lj.init`` draws with them.
    The mask is a tree of bools shaped like the returned params (:data:`MASKS`).
    """
    if method not in MASKS:
        raise ConfigError(f"unknown method {method!r}; use one of {', '.join(MASKS)}")
    if method == "lora" and lora.num_adapters > 1:
        config = lora_config(lora)
        adapters = [lj.adapter(lj.init(k, params, config)) for k in key]
        try:
            params = lj.combine(params, lj.stack(adapters))
        except ValueError as e:
            raise ConfigError(f"lora.num_adapters={lora.num_adapters}: {_one_line(e)}") from None
    elif method == "lora":
        params = lj.init(key, params, lora_config(lora))
    elif method in bottleneck.SUBLAYERS:
        params = bottleneck.init(key, params, method, adapter.bottleneck)
    elif method in prefixes.DESIGNS:
        params = prefixes.init(key, params, method, prefix.length, model)
    if quantize != "none":
        params = quantize_adapted(params, quantize)
    mask = MASKS[method](params)
    if method == "bitfit" and not any(jax.tree.leaves(mask)):
        raise ConfigError(
            "method=bitfit trains the model's biases, but this model has none "
            "(Llama-family models have no biases); set model.add_biases=true "
            "to give every attention and MLP projection a zero-initialised "
            "bias to train (the loaded model computes the same function)"
        )
    return params, mask


def quantize_adapted(params: Any, fmt: str) -> Any:
    """``params`` with every kernel that has LoRA factors (an adapter's or a bank's) stored
    as ``fmt`` (``lj.quantize``); an adapted embedding stays as it is (layers look rows up
    in it, which a quantized table does not serve)."""
    factor = re.compile("(_lora_a|_bank_a)$")
    adapted = [factor.sub("", p) for p in lj.flatten_paths(params) if factor.search(p)]
    adapted = [p for p in adapted if p.endswith("kernel")]
    return lj.quantize(params, fmt, "^(" + "|".join(map(re.escape, adapted)) + ")$")


RESIDUAL_INITS = ("pissa", "olora")  # inits that move W: the run trains on W − s·A₀·B₀


def trains_residual_base(cfg: RunConfig) -> bool:
    """Whether the run's LoRA init moves W (PiSSA, OLoRA): its adapter needs
    :func:`for_original_base`."""
    return cfg.method == "lora" and cfg.lora.init in RESIDUAL_INITS


def for_original_base(cfg: RunConfig, base: Any, trained: Any) -> Any:
    """A PiSSA / OLoRA run's trained tree (:func:`trains_residual_base`) as what an adapter
    must be: a plain rank-2r LoRA of the *original* base (``lj.convert_to_lora``; PEFT's
    ``convert_pissa_to_lora``), the initial factors A₀, B₀ drawn again from the run's key
    (:func:`init_keys`)."""
    initial = jax.jit(lambda b, key: prepare(cfg.method, b, cfg.lora, key)[0])(base, init_keys(cfg))
    return lj.convert_to_lora(trained, lj.adapter(initial))


def prepared_shapes(
    method: str,
    params: Any,
    lora: LoraSection,
    quantize: str = "none",
    adapter: AdapterSection = AdapterSection(),
    prefix: PrefixSection = PrefixSection(),
    model: models.Decoder | None = None,
) -> tuple[Any, Any]:
    """(the shapes :func:`prepare` gives ``params`` (arrays or shapes), its mask): nothing
    is computed, so a run can lay out and compile for the tree before making it."""
    k = lora.num_adapters
    keys = jax.random.key(0) if k == 1 else jax.random.split(jax.random.key(0), k)
    shapes = jax.eval_shape(
        lambda p, key: prepare(method, p, lora, key, quantize, adapter, prefix, model)[0],
        params,
        keys,
    )
    return shapes, MASKS[method](shapes)


def logical_axes(model: models.Decoder, params: Any) -> Any:
    """The logical axis names of the base (``models.logical_axes``), with those of the
    leaves an adapter or prefix method adds (train/adapters.py, train/prefixes.py):
    ``layers`` for the stacked axis of scanned layers, the rest unnamed (replicated: they
    are small). LoRA's leaves get theirs from ``lj.partition_specs``."""
    names = lj.flatten_paths(models.logical_axes(model))
    leaves = lj.flatten_paths(params)
    for mask in (bottleneck.trainable_mask(params), prefixes.trainable_mask(params)):
        for path, added in lj.flatten_paths(mask).items():
            if added:
                stacked = ("layers",) if path.startswith("layers/") else ()
                names[path] = stacked + (None,) * (len(leaves[path].shape) - len(stacked))
    return lj.unflatten_paths(names)


def forward(method: str, apply_fn: Callable[..., Any], dropout: float) -> Callable[..., Any]:
    """``apply_fn`` (``model.apply``) as the method runs it: LoRA's factored forward, with
    LoRA dropout drawn from the ``'dropout'`` rng stream; the bottleneck adapters' forward
    (:func:`decoding_apply`); the prefix's; or unchanged."""
    if method == "lora":
        return lj.apply(apply_fn, dropout=dropout)
    return decoding_apply(method, apply_fn)


def decoding_apply(method: str, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``apply_fn`` as ``models.generate(apply_fn=)`` takes it for a model trained with
    ``method`` (the adapter directory's ``method``): wrapped with the adapters' forward for
    adapter_h / adapter_l (train/adapters.py ``apply``), with the prefix for pre_embed /
    pre_layer (train/prefixes.py ``apply``; each one object per function: no recompiles),
    else unchanged (generate runs LoRA's factored forward itself)."""
    if method in bottleneck.SUBLAYERS:
        return bottleneck.apply(apply_fn, method)
    return prefixes.apply(apply_fn, method) if method in prefixes.DESIGNS else apply_fn
