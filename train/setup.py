"""What a run needs, built once: the model (each process loading only its blocks of the
base), the data, the params placed on the mesh, the initial train state and the compiled
steps (:func:`setup` -> :class:`Setup`).

Nothing here writes a file. ``jit`` happens here, with every sharding from train/mesh.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh
from omegaconf import OmegaConf
from tokenizers import Tokenizer

import lora_jax as lj
import models
from train import bank as bank_lib
from train import layout
from train import mesh as mesh_lib
from train import method as method_lib
from train.batching import START, DataPosition, TrainBatches
from train.config import ConfigError, RunConfig
from train.data import Splits, build_splits, train_batches, validation_batches
from train.evaluate import evaluate
from train.optim import optimizer, schedule, total_steps
from train.step import eval_step, init_state, train_step


@dataclass
class Setup:
    """Everything a run needs, placed on the mesh and compiled; built by :func:`setup`."""

    cfg: RunConfig
    model: models.Decoder
    tokenizer: Tokenizer
    splits: Splits
    mesh: Mesh
    base: Any  # the base params as loaded (global arrays, ``mesh.base`` layout)
    mask: Any  # trainable mask over the params trained from (adapted for LoRA)
    frozen: Any  # the frozen half, on the mesh
    state: Any  # the initial train state, on the mesh
    steps: int  # optimizer updates in the whole run
    step_fn: Callable[..., Any]  # jitted train_step(state, frozen, batches_KxBxL)
    # jitted eval_step(trainable, frozen, batch_BxL), with lora.num_adapters > 1 of one
    # adapter of the bank: eval_step(trainable, frozen, batch_BxL, j) (train/bank.py)
    eval_fn: Callable[..., Any]
    axes: dict | None = None  # the adapter axis of each state leaf (train/bank.py); k = 1: None

    @property
    def state_shardings(self) -> Any:
        """The train state's shardings (train/mesh.py ``state_shardings``)."""
        return jax.tree.map(lambda x: x.sharding, self.state)

    @property
    def num_adapters(self) -> int:
        """k, the adapters trained together (``lora.num_adapters``)."""
        return self.cfg.lora.num_adapters

    @functools.cached_property  # built once: the loop calls it at every logged step
    def learning_rates(self) -> list[optax.Schedule]:
        """Each adapter's learning rate per update (train/optim.py ``schedule``)."""
        return [
            schedule(dataclasses.replace(self.cfg.optim, learning_rate=peak), self.steps)
            for peak in peak_learning_rates(self.cfg)
        ]

    def stream(self, position: DataPosition = START) -> TrainBatches:
        """This process's training stream, from ``position`` (default: the start)."""
        return train_batches(
            self.splits,
            self.cfg.data,
            seed=self.cfg.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            position=position,
        )

    def validate(self, trainable: Any) -> list[dict[str, float]] | None:
        """Validation loss/perplexity of each adapter of ``trainable`` (one, unless
        ``lora.num_adapters > 1``: then one pass over the validation batches per adapter,
        each running that adapter's slot of the bank); None without validation data."""
        if not self.splits.validation:
            return None
        steps = (
            [self.eval_fn]
            if self.axes is None
            else [functools.partial(self._eval_one, j=j) for j in range(self.num_adapters)]
        )
        return [
            evaluate(
                step,
                trainable,
                self.frozen,
                validation_batches(
                    self.splits,
                    self.cfg.data,
                    process_index=jax.process_index(),
                    process_count=jax.process_count(),
                    num_batches=self.cfg.eval.num_batches,
                ),
                self.mesh,
            )
            for step in steps
        ]

    def _eval_one(self, trainable: Any, frozen: Any, batch: Any, j: int) -> Any:
        return self.eval_fn(trainable, frozen, batch, np.int32(j))


def peak_learning_rates(cfg: RunConfig) -> tuple[float, ...]:
    """Each adapter's peak learning rate: ``optim.learning_rates``, else ``learning_rate``."""
    return cfg.optim.learning_rates or (cfg.optim.learning_rate,) * cfg.lora.num_adapters


def run_info(s: Setup) -> dict[str, Any]:
    """What the method costs in parameters and optimizer memory, counted from the arrays.

    ``base_params``: elements of the base model; ``trainable_params``: elements the
    optimizer updates (LoRA factors and bias deltas, every parameter, or the biases);
    ``added_params``: elements the method adds beside the base (LoRA factors, scales,
    deltas); ``optimizer_state_bytes``: bytes of the optimizer state (AdamW: two moments
    per trainable element, plus step counters); ``data``: what became of the rows and
    how they split (train/data.py ``DataReport``).
    """
    base, trainable = _size(s.base), _size(s.state["params"])
    return {
        "method": s.cfg.method,
        "base_params": base,
        "trainable_params": trainable,
        "added_params": _size(s.frozen) + trainable - base,
        "optimizer_state_bytes": sum(x.nbytes for x in jax.tree.leaves(s.state["opt_state"])),
        "data": dataclasses.asdict(s.splits.report),
        "adapters": [
            {
                "directory": str(a.directory),
                "learning_rate": a.learning_rate,
                "init_seed": a.init_seed,
            }
            for a in adapter_plans(s.cfg)
        ],
    }


@dataclass(frozen=True)
class AdapterPlan:
    """One adapter a run trains: where it is saved (relative to the run directory), its
    peak learning rate and its init seed."""

    directory: Path
    learning_rate: float
    init_seed: int


def adapter_plans(cfg: RunConfig) -> list[AdapterPlan]:
    """Each adapter of the run (:func:`adapter_dirs`, :func:`peak_learning_rates`,
    ``method.init_seeds``), in order."""
    return [
        AdapterPlan(*x)
        for x in zip(
            adapter_dirs(cfg), peak_learning_rates(cfg), method_lib.init_seeds(cfg), strict=True
        )
    ]


def adapter_dirs(cfg: RunConfig) -> list[Path]:
    """Where each adapter is saved, relative to the run directory: ``adapter/`` for one,
    ``adapter_<j>/`` for each of ``lora.num_adapters > 1`` (train/bank.py)."""
    k = cfg.lora.num_adapters
    names = [layout.ADAPTER_DIR] if k == 1 else [bank_lib.adapter_dir_name(j) for j in range(k)]
    return [Path(name) for name in names]


def _size(tree: Any) -> int:
    """Elements in ``tree``'s arrays (a quantized kernel counts its weight's elements)."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, lj.QuantizedArray))
    return sum(int(np.prod(np.shape(x))) for x in leaves)


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-ready containers."""
    return json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg))))


def load_model(cfg: RunConfig, mesh: Mesh | None = None) -> tuple[models.Decoder, Any, Tokenizer]:
    """``models.load`` of ``cfg.model`` with its options (train/method.py ``model_options``,
    as ``check_targets`` reads them); the tokenizer must exist. With a ``mesh`` the base
    comes as global arrays laid out by the ``mesh.base`` policy, each process reading
    only the blocks its devices hold; without, on this process's first device."""
    shardings = None
    if mesh is not None:

        def shardings(model: models.Decoder, shapes: Any) -> Any:
            return mesh_lib.param_shardings(
                models.logical_axes(model), shapes, mesh, cfg.mesh.base, cfg.mesh.factors
            )

    model, params, tokenizer = models.load(
        cfg.model.name, shardings=shardings, **method_lib.model_options(cfg)
    )
    if cfg.model.add_biases and model.config.family != "llama":
        raise ConfigError(
            f"model.add_biases=true adds biases to a bias-free Llama model, but "
            f"{cfg.model.name!r} is {model.config.family}, which has biases on every "
            f"projection already; remove model.add_biases"
        )
    if tokenizer is None:
        raise ConfigError(
            f"model {cfg.model.name!r} ships no tokenizer (tokenizer.json); add one to "
            f"the checkpoint directory"
        )
    return model, params, tokenizer


@dataclass(frozen=True)
class Steps:
    """The jitted steps of a run and the shardings they take and give (:func:`build_steps`)."""

    tx: optax.GradientTransformation  # the optimizer of the trainable half
    shardings: Any  # of the params trained from (base, or adapted for LoRA)
    frozen: Any  # shardings of the frozen half
    trainable: Any  # shardings of the trainable half
    state: Any  # shardings of the train state (train/mesh.py ``state_shardings``)
    train: Any  # jitted train_step(state, frozen, batches_KxBxL) -> (state, metrics)
    eval: Any  # jitted eval_step(trainable, frozen, batch_BxL[, j]) -> (loss sum, targets)
    axes: dict | None  # the adapter axis of each state leaf (train/bank.py); k = 1: None
    # init_state(trainable, rng) -> the train state before the first update (train/step.py,
    # or k adapters' from train/bank.py); jit it with out_shardings=state
    init_state: Callable[[Any, jax.Array], Any]


def build_steps(
    cfg: RunConfig, model: models.Decoder, params: Any, mask: Any, mesh: Mesh, steps: int
) -> Steps:
    """The train and eval steps of ``cfg``, jitted with every sharding from train/mesh.py.

    ``params`` (arrays or ``jax.ShapeDtypeStruct``s: only shapes are read) is the tree
    trained from and ``mask`` its trainable mask (train/method.py ``prepare``); ``steps``,
    the updates of the whole run, shapes the learning-rate schedule. ``lora-jax train``
    runs these steps and ``lora-jax plan`` compiles them (train/plan.py). With
    ``lora.num_adapters > 1`` the params hold a bank and the steps are train/bank.py's.
    """
    shardings = mesh_lib.param_shardings(
        method_lib.logical_axes(model, params), params, mesh, cfg.mesh.base, cfg.mesh.factors
    )
    frozen_sh, trainable_sh = lj.split(shardings, mask)
    frozen, trainable = lj.split(params, mask)

    def make_tx(peak: Any) -> optax.GradientTransformation:
        # the method's mask selects every leaf of the trainable half (train/method.py MASKS)
        optim = dataclasses.replace(cfg.optim, learning_rate=peak)
        return lj.optimizer(
            optimizer(optim, steps),
            trainable,
            method_lib.MASKS[cfg.method],
            loraplus_lr_ratio=cfg.optim.loraplus_lr_ratio,
        )

    peaks = peak_learning_rates(cfg)
    tx = make_tx(peaks[0])
    state_sh = mesh_lib.state_shardings(tx, trainable, trainable_sh, mesh)
    forward = mesh_lib.with_activation_rules(
        method_lib.forward(cfg.method, model.apply, cfg.lora.dropout), mesh
    )
    replicated = mesh_lib.replicated(mesh)
    smoothing = cfg.optim.label_smoothing
    if cfg.lora.num_adapters == 1:
        axes = None
        make_state = functools.partial(init_state, tx=tx)
        step, evaluation = train_step(forward, tx, smoothing), eval_step(forward)
        eval_sh = (trainable_sh, frozen_sh, mesh_lib.batch_sharding(mesh, 2))
    else:
        axes = bank_lib.state_axes(tx, trainable, bank_lib.adapter_axes(trainable, params))
        frozen_axes = bank_lib.adapter_axes(frozen, params)
        make_state = functools.partial(bank_lib.init_state, tx=tx, axes=axes)
        step = bank_lib.train_step(forward, make_tx, peaks, smoothing, axes, frozen_axes)
        evaluation = bank_lib.eval_step(forward, axes["params"], frozen_axes)
        eval_sh = (trainable_sh, frozen_sh, mesh_lib.batch_sharding(mesh, 2), replicated)
    train_fn = jax.jit(
        step,
        in_shardings=(state_sh, frozen_sh, mesh_lib.batch_sharding(mesh, 3)),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
    eval_fn = jax.jit(evaluation, in_shardings=eval_sh, out_shardings=replicated)
    return Steps(
        tx,
        shardings,
        frozen_sh,
        trainable_sh,
        state_sh,
        train_fn,
        eval_fn,
        axes,
        lambda trainable, rng: make_state(trainable, rng=rng),
    )


def setup(cfg: RunConfig, log: Callable[[str], None] = print) -> Setup:
    """Load, split, place and compile; nothing is written. ``cfg.model.param_dtype="auto"``
    is resolved (train/method.py ``resolve``): ``Setup.cfg`` says what was loaded."""
    cfg = method_lib.resolve(cfg)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_batch_fits(cfg.data.batch_size, mesh)
    model, base, tokenizer = load_model(cfg, mesh)
    splits = build_splits(cfg.data, tokenizer, cfg.seed, model.config.eos_token_id)
    log(f"data: {splits.report.summary()}")

    if cfg.lora.num_adapters > 1 and jax.process_count() > 1:
        raise ConfigError(
            f"lora.num_adapters={cfg.lora.num_adapters} runs in one process only (each "
            f"adapter is cut out of the bank on the host when saved); run one process, or "
            f"one adapter per run"
        )
    init_key = method_lib.init_keys(cfg)
    dropout_key = jax.random.split(jax.random.key(cfg.seed))[1]

    def prepared(base: Any, key: jax.Array) -> Any:
        prepared, _ = method_lib.prepare(
            cfg.method, base, cfg.lora, key, cfg.model.quantize, cfg.adapter, cfg.prefix, model
        )
        return prepared

    shapes, mask = method_lib.prepared_shapes(
        cfg.method, base, cfg.lora, cfg.model.quantize, cfg.adapter, cfg.prefix, model
    )
    batches_per_epoch = train_batches(splits, cfg.data, seed=cfg.seed).steps_in_epoch(0)
    steps = total_steps(cfg.optim, batches_per_epoch)
    compiled = build_steps(cfg, model, shapes, mask, mesh, steps)
    # the factors are made where they live: no process holds more than its blocks
    params = jax.jit(prepared, out_shardings=compiled.shardings)(base, init_key)
    frozen, trainable = lj.split(params, mask)
    n_trainable, n_all = _size(trainable), _size(params)
    log(
        f"method {cfg.method}: {n_trainable:,} trainable of {n_all:,} parameters "
        f"({100 * n_trainable / n_all:.3f}%); mesh {dict(mesh.shape)}"
    )
    state = jax.jit(compiled.init_state, out_shardings=compiled.state)(trainable, dropout_key)
    return Setup(
        cfg,
        model,
        tokenizer,
        splits,
        mesh,
        base,
        mask,
        frozen,
        state,
        steps,
        compiled.train,
        compiled.eval,
        compiled.axes,
    )
