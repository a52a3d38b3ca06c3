"""Run configuration: typed frozen dataclasses, loaded from YAML with dotted overrides.

A run is described by one :class:`RunConfig`. It is read from a YAML file in
``configs/`` and then patched by ``key=value`` command-line overrides::

    cfg = load_config("configs/e2e_lora.yaml", ["lora.rank=4", "data.path=/x.csv"])

Parsing and type coercion are OmegaConf structured configs (the dataclasses below
are the schema). OmegaConf rather than a hand-written parser, draccus or ml_collections:
the schema stays plain frozen dataclasses that the rest of the code imports, overrides
are YAML-typed and checked against them (``Literal`` choices included), and it brings
interpolation and YAML save/load. This module adds what OmegaConf does not give in
one place:

* an unknown or misspelled key, in the YAML file or an override, is a
  :class:`ConfigError` naming the full dotted key and suggesting the closest valid
  one (``difflib``), e.g. ``lora.rnak`` -> ``lora.rank``, ``rank`` -> ``lora.rank``;
* a value of the wrong type or out of range is a :class:`ConfigError` naming the key;
* :func:`save_config` / :func:`load_config` round-trip the resolved config, which
  is saved with every run.

Override values are parsed as YAML: ``lora.targets=[q_proj,v_proj]``,
``'lora.rank_pattern={q_proj: 4}'`` (note the space after the colon),
``optim.max_steps=null``. OmegaConf interpolations such as
``checkpoint.dir=${output_dir}/ckpt`` are resolved before the dataclasses are built.

Relative paths in a config (``data.path``, ``output_dir``, ``checkpoint.dir``) are
relative to the current directory, as every path on a command line is (the shipped
configs assume the repository root, where ``make`` runs): resolve them with
:func:`resolve_path`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the key and the fix."""


def _bounded(
    default: Any,
    *,
    low: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> Any:
    """A dataclass field whose value, unless None, must be ``>= low``, ``> above``, ``< below``."""
    return field(default=default, metadata={"low": low, "above": above, "below": below})


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load (``models.load(name)``) and how to run it."""

    name: str = "smollm2-135m"  # a preset name or a path understood by models.load
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    # stored parameter dtype of the base; "auto": bfloat16 for a base of >= 1B parameters
    # that the method freezes (LoRA, BitFit: its factors, biases and optimizer state stay
    # float32), float32 otherwise (full fine-tuning keeps float32 master weights)
    param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    scan_layers: bool = False  # one scanned layer body instead of unrolled layers
    # what each layer keeps for the backward pass (models.REMAT_POLICIES): "dots" keeps the
    # matmul outputs and recomputes the elementwise rest, "full" keeps only the layer's
    # input, "none" keeps everything. "dots" is the default: on SmolLM2-135M (8×128, CPU,
    # scanned layers) its step is ~5% faster and its XLA peak ~35% lower than "none".
    remat: Literal["none", "dots", "dots_no_batch", "full"] = "dots"
    # the attention kernel (models/attention.py): "chunked" (flash-style, no L x L scores)
    # from 1024 x 1024 query-key pairs on, "reference" below; or either, forced
    attention: Literal["auto", "reference", "chunked"] = "auto"
    # zero-initialised biases on every attention and MLP projection of a bias-free (Llama)
    # model, i.e. HF attention_bias=mlp_bias=True; the model computes the same function;
    # BitFit needs it on Llama
    add_biases: bool = False
    # the frozen kernels that lora.targets adapts, stored quantized (lj.quantize after
    # lj.init; QLoRA's nf4 with double-quantised block scales of 64, or int8 per channel)
    # and dequantised inside each layer; method=lora only
    quantize: Literal["none", "int8", "nf4"] = "none"


# The models.load options of model.add_biases=true (Hugging Face LlamaConfig's flags).
ADDED_BIASES = {"attention_bias": True, "mlp_bias": True}


@dataclass(frozen=True)
class LoraSection:
    """The fields of ``lora_jax.LoraConfig``: ``LoraConfig(**dataclasses.asdict(section))``."""

    rank: int = _bounded(8, low=1)
    alpha: float = _bounded(16.0, above=0.0)  # scale alpha / rank (alpha / sqrt(rank): rsLoRA)
    targets: tuple[str, ...] = (".*/(q_proj|v_proj)/kernel",)  # regexes over whole param paths
    dropout: float = _bounded(0.0, low=0.0, below=1.0)
    # how A is drawn (B = 0), or PiSSA / OLoRA: A, B from W's SVD / QR, the base W − s·A·B
    init: Literal["gaussian", "kaiming_uniform", "pissa", "olora"] = "gaussian"
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    rank_pattern: dict[str, int] | None = None  # {regex or trailing path segment: rank}
    alpha_pattern: dict[str, float] | None = None
    use_dora: bool = False  # DoRA: a trained magnitude beside each adapted kernel
    # k adapters trained together on the frozen base (train/bank.py), each saved as its own
    # adapter directory; lj.LoraConfig does not take these two (train/method.py lora_config)
    num_adapters: int = _bounded(1, low=1)
    # adapter j's A is drawn as a run with seed init_seeds[j] draws its one (the first half
    # of jax.random.split(key(s))); None: seed + j. Data order and dropout follow ``seed``.
    init_seeds: tuple[int, ...] | None = None


@dataclass(frozen=True)
class AdapterSection:
    """The bottleneck adapters of ``method: adapter_h | adapter_l`` (train/adapters.py)."""

    # m: each adapter projects D -> m -> D, adding 2·D·m + m + D parameters per adapted
    # sublayer (+ 2·D for AdapterL's LayerNorm); read only by the adapter methods
    bottleneck: int = _bounded(8, low=1)


@dataclass(frozen=True)
class PrefixSection:
    """The prefix of ``method: pre_embed | pre_layer`` (train/prefixes.py)."""

    # P: trainable positions before every row's tokens (Li & Liang's l_p); P·D parameters
    # for pre_embed, N·P·D for pre_layer; read only by the prefix methods
    length: int = _bounded(10, low=1)


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they become fixed-shape batches (train/data.py)."""

    path: str | None = None  # local .csv/.json/.jsonl/.parquet or a hub name; required
    format: Literal["e2e", "prompt_completion", "text"] = "e2e"
    source_split: str = "train"  # the split of the loaded data set to read
    split_key: str | None = None  # grouping column of the split; None: the format's default
    validation_fraction: float = _bounded(0.1, low=0.0, below=1.0)  # of the groups
    max_length: int = _bounded(96, low=2)  # tokens per row (L)
    batch_size: int = _bounded(8, low=1)  # rows per global batch (B), all processes together
    packing: bool = False  # several examples per row, with segment ids
    # appended to every target; also the padding token. None: the model's own EOS token (its
    # config's eos_token_id; SmolLM2-Instruct's is <|im_end|>, the end of a ChatML turn)
    eos_token: str | None = None
    on_malformed: Literal["skip", "error"] = "skip"  # missing/empty/non-string field, long prompt
    on_too_long: Literal["truncate", "skip", "error"] = "truncate"  # prompt+target > max_length


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup and decay; a step is one optimizer update."""

    learning_rate: float = _bounded(2e-4, low=0.0)
    weight_decay: float = _bounded(0.01, low=0.0)
    b1: float = _bounded(0.9, low=0.0, below=1.0)
    b2: float = _bounded(0.999, low=0.0, below=1.0)
    eps: float = _bounded(1e-8, low=0.0)
    warmup_steps: int = _bounded(0, low=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # decay after warmup
    max_steps: int | None = _bounded(None, low=1)  # when set, it wins over epochs
    epochs: int = _bounded(1, low=1)
    grad_clip: float | None = _bounded(1.0, low=0.0)  # global-norm clip; None: no clipping
    grad_accum_steps: int = _bounded(1, low=1)  # micro-batches (data batches) per update
    label_smoothing: float = _bounded(0.0, low=0.0, below=1.0)
    # one peak rate per adapter (lora.num_adapters of them), each on the schedule above;
    # None: every adapter uses learning_rate
    learning_rates: tuple[float, ...] | None = None
    # LoRA+ (lj.optimizer): B's (and DoRA magnitudes', bias deltas') rate this times A's
    loraplus_lr_ratio: float | None = _bounded(None, above=0.0)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes (exactly one may be -1, meaning "all remaining devices") and
    how the parameters lie on it (train/mesh.py ``BASE_RULES``)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # the base weights: "fsdp" shards their embed axis over fsdp and heads/MLP/vocabulary
    # over tensor; "tensor" the latter only; "replicated": a whole copy on every device
    base: Literal["fsdp", "tensor", "replicated"] = "fsdp"
    # LoRA factors: "inherit" the sharding of the weight they adapt, or "replicated"
    factors: Literal["inherit", "replicated"] = "inherit"


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # None: <output_dir>/checkpoints
    every_steps: int = _bounded(100, low=0)  # 0: only at the end
    keep_last: int = _bounded(2, low=1)
    async_save: bool = True


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = _bounded(50, low=0)  # 0: only before and after training
    num_batches: int | None = _bounded(None, low=1)  # None: the whole validation split
    samples: int = _bounded(3, low=0)  # greedy generations after training, distinct prompts
    max_new_tokens: int = _bounded(48, low=1)  # length limit of those generations


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = _bounded(10, low=1)
    jsonl: bool = True
    tensorboard: bool = True


@dataclass(frozen=True)
class RunConfig:
    """One training run. ``method`` selects what is trainable: LoRA factors, all, or biases."""

    seed: int = _bounded(0, low=0)  # data split, shuffling and initialisation
    # lora | full | bitfit | ft_top2 (the last two layers) | adapter_h | adapter_l
    # (bottleneck adapters, section ``adapter``) | pre_embed | pre_layer (prefix tuning,
    # section ``prefix``): train/method.py
    method: Literal[
        "lora", "full", "bitfit", "ft_top2", "adapter_h", "adapter_l", "pre_embed", "pre_layer"
    ] = "lora"
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    prefix: PrefixSection = field(default_factory=PrefixSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _check_bounds(self, "")
        axes = {k: getattr(self.mesh, k) for k in ("data", "fsdp", "tensor")}
        bad = {k: v for k, v in axes.items() if v != -1 and v < 1}
        if bad:
            raise ConfigError(
                f"config keys {sorted('mesh.' + k for k in bad)} must be >= 1 "
                f"or -1 (fill with the remaining devices), got {bad}"
            )
        if list(axes.values()).count(-1) > 1:
            raise ConfigError(
                f"at most one mesh axis may be -1 (fill), got mesh={axes}; "
                f"give the others explicit sizes"
            )
        if self.method == "lora" and not self.lora.targets:
            raise ConfigError(
                "lora.targets is empty; give regexes over parameter paths, "
                "e.g. lora.targets=['.*/(q_proj|v_proj)/kernel']"
            )
        _check_adapters(self)
        _check_variants(self)
        if self.method in ("pre_embed", "pre_layer") and self.data.packing:
            raise ConfigError(
                f"method={self.method} puts one prefix before each row, which only the row's "
                f"first example would see with data.packing=true; set data.packing=false"
            )


def _check_adapters(cfg: RunConfig) -> None:
    """ConfigError for per-adapter settings that do not fit ``lora.num_adapters`` (k), or
    k > 1 with what the k-adapter step does not handle per adapter."""
    k = cfg.lora.num_adapters
    for key, values in (
        ("optim.learning_rates", cfg.optim.learning_rates),
        ("lora.init_seeds", cfg.lora.init_seeds),
    ):
        if values is not None and len(values) != k:
            raise ConfigError(
                f"{key} has {len(values)} value(s) for lora.num_adapters={k}; give one per "
                f"adapter, or set lora.num_adapters={len(values)}"
            )
    if any(lr < 0 for lr in cfg.optim.learning_rates or ()):
        raise ConfigError(
            f"optim.learning_rates must be >= 0, got {list(cfg.optim.learning_rates)}"
        )
    if any(s < 0 for s in cfg.lora.init_seeds or ()):
        raise ConfigError(f"lora.init_seeds must be >= 0, got {list(cfg.lora.init_seeds)}")
    if k == 1:
        return
    if cfg.method != "lora":
        raise ConfigError(
            f"lora.num_adapters={k} trains {k} LoRA adapters, but method={cfg.method} has no "
            f"adapters; set method=lora, or lora.num_adapters=1"
        )
    if cfg.lora.bias != "none":
        raise ConfigError(
            f"lora.num_adapters={k} holds the adapters in one bank (lj.stack), which has no "
            f"bias deltas; set lora.bias=none, or train one adapter per run"
        )


def _check_variants(cfg: RunConfig) -> None:
    """ConfigError for a LoRA variant (``model.quantize``, ``optim.loraplus_lr_ratio``,
    ``lora.use_dora``, ``lora.init`` pissa/olora) where it does not apply."""
    lora_only = {
        "model.quantize": cfg.model.quantize != "none",
        "optim.loraplus_lr_ratio": cfg.optim.loraplus_lr_ratio is not None,
    }
    for key, used in lora_only.items():
        if used and cfg.method != "lora":
            raise ConfigError(
                f"{key} applies to LoRA's frozen base and factors, but method={cfg.method} "
                f"has none; set method=lora, or leave {key} unset"
            )
    k = cfg.lora.num_adapters
    per_adapter_base = {
        "lora.use_dora=true": cfg.lora.use_dora,
        f"lora.init={cfg.lora.init}": cfg.lora.init in ("pissa", "olora"),
    }
    for key, used in per_adapter_base.items():
        if used and k > 1:
            raise ConfigError(
                f"{key} is not supported with lora.num_adapters={k} (a bank holds plain "
                f"LoRA factors of one shared base); train one adapter per run"
            )
    if cfg.lora.init in ("pissa", "olora"):
        # the run saves lj.convert_to_lora's rank-2r adapter of the original base, exact
        # only for plain factors on an unquantized residual base
        for key, used in {
            "lora.use_dora=true": cfg.lora.use_dora,
            f"model.quantize={cfg.model.quantize}": cfg.model.quantize != "none",
        }.items():
            if used:
                raise ConfigError(
                    f"lora.init={cfg.lora.init} with {key} is not supported: the run saves "
                    f"its adapter converted for the original base (lj.convert_to_lora), "
                    f"which holds for plain LoRA on an unquantized base; drop one of them"
                )


def _check_bounds(node: Any, prefix: str) -> None:
    """Raise ConfigError for any ``_bounded`` field of ``node`` (recursively) out of range."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_bounds(value, key + ".")
            continue
        low, above, below = (f.metadata.get(k) for k in ("low", "above", "below"))
        if value is None:
            continue
        if low is not None and value < low:
            raise ConfigError(f"config key '{key}' must be >= {low}, got {value!r}")
        if above is not None and value <= above:
            raise ConfigError(f"config key '{key}' must be > {above}, got {value!r}")
        if below is not None and value >= below:
            raise ConfigError(f"config key '{key}' must be < {below}, got {value!r}")


def _sections(cls: type) -> dict[str, type]:
    """Field name -> dataclass type, for the fields of ``cls`` that are config sections."""
    return {
        f.name: f.default_factory
        for f in dataclasses.fields(cls)
        if dataclasses.is_dataclass(f.default_factory)
    }


def _valid_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections and leaves, e.g. ``lora``, ``lora.rank``."""
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        section = _sections(cls).get(f.name)
        if section is not None:
            keys.extend(_valid_keys(section, prefix + f.name + "."))
    return keys


def _suggest(key: str) -> str:
    """A hint for an unknown dotted key: a close key beside it, else a close key in another
    section (``rank`` -> ``lora.rank``), else the list of valid keys beside it."""
    parent, _, leaf = key.rpartition(".")
    valid = _valid_keys()
    siblings = [k.rsplit(".", 1)[-1] for k in valid if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?"
    leaves = {k.rsplit(".", 1)[-1] for k in valid}
    close = difflib.get_close_matches(leaf, sorted(leaves), n=1, cutoff=0.8)
    if close:
        options = " or ".join(repr(k) for k in valid if k.rsplit(".", 1)[-1] == close[0])
        return f"; did you mean {options}?"
    return f"; valid keys{f' in {parent!r}' if parent else ''}: {', '.join(siblings)}"


def _check_keys(node: Mapping, cls: type, prefix: str, source: str) -> None:
    """Raise ConfigError for a key of ``node`` that ``cls`` lacks, or a section set to a scalar."""
    names = {f.name for f in dataclasses.fields(cls)}
    sections = _sections(cls)
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' in {source}{_suggest(dotted)}")
        if key in sections:
            if not isinstance(value, Mapping):
                example = f"{dotted}.{dataclasses.fields(sections[key])[0].name}=..."
                raise ConfigError(
                    f"config key '{dotted}' in {source} is a section, not a value; "
                    f"set its fields, e.g. {example}"
                )
            _check_keys(value, sections[key], dotted + ".", source)


def _merge(base: DictConfig, patch: DictConfig, source: str) -> DictConfig:
    """Merge ``patch`` over ``base`` after checking its keys; type errors name key and source."""
    _check_keys(OmegaConf.to_container(patch, resolve=False), RunConfig, "", source)
    try:
        return OmegaConf.merge(base, patch)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e, source)) from None


def _describe(e: OmegaConfBaseException, source: str) -> str:
    """One line: which key, what is wrong with it, where it came from."""
    message = (getattr(e, "msg", None) or str(e)).splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"config key '{key}' in {source}: {message}" if key else f"{source}: {message}"


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, DictConfig]]:
    """``["a.b=1", ...]`` -> ``[("override 'a.b=1'", {a: {b: 1}}), ...]``; values parsed as YAML."""
    parsed = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value, e.g. lora.rank=8")
        try:
            parsed.append((f"override '{item}'", OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as e:
            raise ConfigError(_describe(e, f"override '{item}'")) from None
    return parsed


def config_from_layers(layers: Sequence[tuple[str, DictConfig]]) -> RunConfig:
    """Merge (source, patch) layers in order over the schema defaults and build the dataclasses."""
    merged = OmegaConf.structured(RunConfig)
    for source, patch in layers:
        merged = _merge(merged, patch, source)
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e, "the merged config")) from None


def _read_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        shipped = sorted(str(p) for p in Path("configs").glob("*.yaml"))
        hint = f"pass one of {shipped}" if shipped else "pass the path of a run config YAML"
        raise ConfigError(f"config file {path} does not exist; {hint}")
    loaded = OmegaConf.load(path)
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got a list")
    return loaded


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The RunConfig: schema defaults, then the YAML file at ``path`` (if any), then overrides."""
    layers = [] if path is None else [(f"config file {path}", _read_yaml(path))]
    return config_from_layers(layers + parse_overrides(overrides))


def config_to_yaml(cfg: RunConfig) -> str:
    """The full resolved config as YAML text; :func:`load_config` reads it back unchanged."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (creating parent directories) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(cfg))
    return path


def resolve_path(path: str | Path) -> Path:
    """An absolute path: ``path`` itself if absolute, else relative to the current directory."""
    return Path(path).expanduser().absolute()
