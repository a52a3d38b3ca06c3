"""``lora-jax experiment``: the LoRA paper's E2E comparison (its Table 3) on this code.

    lora-jax experiment configs/experiments/e2e_table.yaml [key=value ...] [--fresh] [--methods NAME ...]

An experiment config (:class:`ExperimentConfig`, YAML) names a base run config, an E2E
CSV and a list of methods; with ``extends: OTHER.yaml`` it takes every key it does not set
from another experiment config. The command

1. splits the CSV by MR into ``trainval.csv`` and ``test.csv`` in the output directory
   (``test_fraction`` of the distinct MRs, seeded; no MR on both sides, asserted); each
   run splits ``trainval.csv`` again by MR into train and validation
   (``data.validation_fraction``), so the three sets share no MR;
2. trains every method at every learning rate of its grid, each run a separate
   ``lora-jax train`` process (so its peak RSS is its own, read with ``os.wait4``) with
   the base config, the shared ``overrides``, the method's ``overrides`` and
   ``optim.learning_rate``; a finished run with the same config is reused, an
   interrupted one resumes from its checkpoint. With ``grid_in_one_process: true`` a LoRA
   method's grid is one ``lora-jax train`` process instead (``runs/<method>/lr_grid``):
   ``lora.num_adapters`` = the number of rates, ``optim.learning_rates`` the grid and
   every adapter initialised as the per-rate runs are (``lora.init_seeds``: the run
   config's seed each), so adapter j is the run at rate j up to float rounding
   (train/bank.py); each adapter directory ``adapter_<j>`` is evaluated and reported as
   that rate's run, with that process's peak RSS and step time (all rates' together);
   with ``runs_from: OTHER_OUTPUT_DIR`` nothing is trained: the finished runs of another
   experiment split the same way are decoded (e.g. under other decoding options), and every
   output of this one goes into its own output_dir;
3. keeps, per method, the learning rate that scores best on the run's validation MRs
   (``select``): the highest BLEU of their decoded outputs (``validation_bleu``, the
   default: ``lora-jax eval`` of each run on ``validation.csv``, the MRs the run held out
   for validation, decoded as the test MRs are) or the lowest final validation loss
   (``validation_loss``). The test MRs play no part in the choice. The two can disagree:
   a high rate can lower the teacher-forced loss and still end outputs early;
4. decodes and scores the test MRs with ``lora-jax eval`` (studies/e2e/evaluation.py) for the
   chosen run of each method, and for the base model untrained (a method without
   learning rates: zero-shot);
   a method with ``seeds`` is trained again at its chosen rate with each of those
   run-config seeds, and each such run is decoded too: its row's metrics are the mean
   and standard deviation over the runs, since one run's BLEU moves by about as much as
   the methods differ;
5. measures every row's batch-1 decoding latency side by side in one process, as it
   would serve (LoRA merged; ``latency``, studies/e2e/latency.py; ``latency.new_tokens:
   0`` skips it), against the ``reference`` row;
6. writes ``results.json`` in the output directory, and the report (``report``,
   Markdown: the table, the learning-rate choice, the command and this config) and the
   plot of each metric against trainable parameters (``plot``, PNG).

The output directory is claimed first (``train/rundir.py``, kind ``experiment``): a new or
empty directory, or this experiment's own, so results are resumed, never written over
someone else's files; ``--fresh`` deletes it only when it carries that mark. Method names
become directory names, so they are limited to letters, digits, ``.``, ``_`` and ``-``.
The report and the plot overwrite only a report and a plot written before.

Per method, the table holds: trainable parameters and their share of the base's, the
size on disk of what the run saves (the adapter directory: LoRA factors, BitFit biases,
or every parameter for full fine-tuning, i.e. a full checkpoint), the optimizer-state
bytes (train/run.py ``run_info``), the training process's peak RSS, the median
wall-clock seconds per update, the validation loss and the five E2E metrics.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from studies.e2e import latency as latency_lib
from studies.e2e import metrics as e2e_metrics
from studies.e2e.decoding import PAPER_DECODING
from studies.e2e.evaluation import PREDICTIONS_FILE, SCORES_FILE, load_target, read_e2e
from studies.e2e.latency import LatencySpec
from train import layout, rundir
from train.bank import adapter_dir_name, adapter_split
from train.config import ConfigError, load_config, resolve_path, save_config
from train.errors import UserError
from train.machine import machine
from train.metrics import read_records
from train.ordering import split_by_group
from train.plot import pyplot
from train.setup import adapter_dirs

RESULTS_FILE = "results.json"
LATENCY_FILE = "latency.json"
PROCESS_FILE = "process.json"  # peak RSS and wall time of a run's training process
EVAL_ARGS_FILE = "eval_args.json"
LOG_FILE = "log.txt"
REPORT_MARK = "# E2E NLG: "  # how a report of ours begins (the rest is the config's title)
# a method's name is a directory name under output_dir: no separators, no '..'
METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class ExperimentError(UserError, RuntimeError):
    """A run of the experiment failed; the message names it and where its log is."""


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: a name, run-config overrides and a learning-rate grid.

    No learning rates: the base model is evaluated untrained (zero-shot). ``seeds``: the
    chosen rate is trained again with each of these run-config seeds and every such run is
    decoded on the test MRs, so the row states its metrics' spread across training runs.
    """

    name: str
    # the method's own run config (e.g. a shipped configs/*.yaml), instead of base_config
    config: str | None = None
    overrides: tuple[str, ...] = ()
    learning_rates: tuple[float, ...] = ()
    # further run-config seeds (data split, data order, initialisation, dropout) trained at
    # the chosen rate: the row's metrics become the mean over these runs and the chosen one
    seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class EvalSpec:
    """How the test MRs are decoded (``lora-jax eval`` options)."""

    greedy: bool = False  # True: one beam; False: the paper's beam search (10 beams)
    limit: int | None = None  # only the first N test MRs
    batch_size: int = 8
    max_new_tokens: int = 64


@dataclass(frozen=True)
class ExperimentConfig:
    base_config: str = "configs/e2e_lora.yaml"  # the run config every method starts from
    data: str = "../shared/data/e2e/devset.csv"  # E2E CSV (mr, ref), split here by MR
    test_fraction: float = 0.2  # of the distinct MRs, held out for the metrics
    seed: int = 0  # the test split; runs use their config's seed
    output_dir: str = "runs/experiments/e2e_table"
    # another experiment's output_dir whose finished runs this one decodes instead of
    # training its own (same data, split and run configs; nothing is written there)
    runs_from: str | None = None
    report: str = "docs/results.md"
    title: str = "LoRA vs full fine-tuning vs BitFit on SmolLM2-135M"  # the report's heading
    reference: str = "full"  # the method whose row the others are compared with (Ratios)
    plot: str = "docs/results.png"
    overrides: tuple[str, ...] = ()  # run-config overrides shared by every method
    # how a method's learning rate is chosen on the validation MRs: the highest BLEU of the
    # decoded outputs, or the lowest teacher-forced loss
    select: Literal["validation_bleu", "validation_loss"] = "validation_bleu"
    # true: a LoRA method's learning rates train together as the adapters of one
    # `lora-jax train` process (lora.num_adapters), not one process per rate
    grid_in_one_process: bool = False
    eval: EvalSpec = field(default_factory=EvalSpec)
    # batch-1 decoding latency of every row, side by side (studies/e2e/latency.py)
    latency: LatencySpec = field(default_factory=LatencySpec)
    methods: list[MethodSpec] = field(default_factory=list)


def load_experiment(
    path: str | Path, overrides: Sequence[str] = (), methods: Sequence[str] = ()
) -> ExperimentConfig:
    """The experiment config at ``path`` with dotted ``overrides`` (e.g. ``eval.limit=20``),
    keeping only the ``methods`` named, in the config's order (all when none are)."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(str(p) for p in Path("configs/experiments").glob("*.yaml"))
        hint = f"pass one of {shipped}" if shipped else "pass the path of an experiment YAML"
        raise ConfigError(f"experiment config {path} does not exist; {hint}")
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(ExperimentConfig),
            _experiment_yaml(path),
            OmegaConf.from_dotlist(list(overrides)),
        )
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(
            f"experiment config {path}"
            f"{f', key {key!r}' if key else ''}: "
            f"{str(e).splitlines()[0]}; valid top-level keys: "
            f"{[f.name for f in dataclasses.fields(ExperimentConfig)]}"
        ) from None
    names = [m.name for m in cfg.methods]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"experiment config {path}: methods need distinct names, got {names}")
    if unknown := sorted(set(methods) - set(names)):
        raise ConfigError(
            f"experiment config {path} has no method named {', '.join(map(repr, unknown))}; "
            f"pass --methods from {names}"
        )
    if methods:
        cfg = dataclasses.replace(cfg, methods=[m for m in cfg.methods if m.name in methods])
    for name in names:
        if not METHOD_NAME.fullmatch(name):
            raise ConfigError(
                f"experiment config {path}: method name {name!r} is used as a "
                f"directory name under output_dir; use letters, digits, '.', '_' "
                f"and '-' only, starting with a letter or digit (at most 100)"
            )
    if not 0 < cfg.test_fraction < 1:
        raise ConfigError(
            f"experiment config {path}: test_fraction must be in (0, 1), got {cfg.test_fraction}"
        )
    for method in cfg.methods:  # a typo in an override fails now, not an hour in
        seed = run_config(cfg, method, 1e-3, Path("/unused"), Path("/unused")).seed
        if method.seeds and (
            not method.learning_rates
            or seed in method.seeds
            or len(set(method.seeds)) != len(method.seeds)
        ):
            raise ConfigError(
                f"experiment config {path}: method {method.name!r} has seeds "
                f"{list(method.seeds)}; they must be distinct, differ from the "
                f"run config's seed ({seed}) and come with learning_rates"
            )
    return cfg


def _experiment_yaml(path: Path) -> DictConfig:
    """The YAML at ``path`` merged over the experiment config it ``extends`` (a path, relative
    to the repository root), if any: its keys replace the parent's, lists (``methods``) whole."""
    text = OmegaConf.load(path)
    parent = text.pop("extends", None)
    if parent is None:
        return text
    if not resolve_path(parent).is_file():
        raise ConfigError(f"experiment config {path} extends {parent}, which does not exist")
    return OmegaConf.merge(_experiment_yaml(resolve_path(parent)), text)


def run_config(
    cfg: ExperimentConfig,
    method: MethodSpec,
    learning_rate: float,
    data: Path,
    run_dir: Path,
    seed: int | None = None,
    together: Sequence[str] = (),
):
    """The RunConfig of one run: the method's config (else the experiment's base config),
    the shared overrides, the method's, then ours
    (``seed``: the run config's ``seed``, when not the configs' own; ``together``: the
    overrides of a grid trained in one process, :func:`grid_overrides`)."""
    return load_config(
        resolve_path(method.config or cfg.base_config),
        [
            *cfg.overrides,
            *method.overrides,
            f"optim.learning_rate={learning_rate}",
            f"data.path={data}",
            f"output_dir={run_dir}",
            *([f"seed={seed}"] if seed is not None else []),
            *together,
        ],
    )


def grid_overrides(learning_rates: Sequence[float], seed: int) -> list[str]:
    """The run-config overrides that train ``learning_rates`` as the adapters of one run,
    each initialised as a run of ``seed`` at that rate is (train/bank.py)."""
    k = len(learning_rates)
    return [
        f"lora.num_adapters={k}",
        f"optim.learning_rates=[{','.join(map(repr, learning_rates))}]",
        f"lora.init_seeds=[{','.join([str(seed)] * k)}]",
    ]


def split_test(
    data: str | Path, test_fraction: float, seed: int, out: Path
) -> tuple[Path, Path, dict[str, int]]:
    """Write ``trainval.csv`` and ``test.csv`` (columns mr, ref) into ``out``, by MR.

    Returns their paths and the counts of MRs and rows on each side.
    """
    groups = read_e2e(resolve_path(data))
    mrs = [mr for mr, _ in groups]
    trainval_idx, test_idx = split_by_group(mrs, test_fraction, seed)
    sides = {"trainval": [groups[i] for i in trainval_idx], "test": [groups[i] for i in test_idx]}
    shared = {mr for mr, _ in sides["trainval"]} & {mr for mr, _ in sides["test"]}
    assert not shared, f"MRs on both sides of the test split: {sorted(shared)[:3]}"
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for side, rows in sides.items():
        mrs, refs = _write_e2e(out / f"{side}.csv", rows)
        counts |= {f"{side}_mrs": mrs, f"{side}_rows": refs}
    return out / "trainval.csv", out / "test.csv", counts


def _write_e2e(path: Path, groups: Sequence[tuple[str, list[str]]]) -> tuple[int, int]:
    """An E2E CSV (columns mr, ref; a row per reference) of ``groups``; (MRs, rows) written."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mr", "ref"])
        writer.writerows((mr, ref) for mr, refs in groups for ref in refs)
    return len(groups), sum(len(refs) for _, refs in groups)


@dataclass(frozen=True)
class ValidationSet:
    """The MRs that runs of one (seed, validation fraction) hold out, as an E2E CSV."""

    path: Path
    mrs: int
    rows: int


def validation_split(trainval: Path, seed: int, fraction: float, out: Path) -> ValidationSet:
    """``validation_seed*_fraction*.csv`` (columns mr, ref): the MRs of ``trainval`` that a
    run with this ``seed`` and ``data.validation_fraction`` holds out for validation.

    The split is train/data.py's: ``split_by_group`` of the MRs. A run reports the groups it
    held out (``run_info.json``); :func:`check_validation_split` compares the two.
    """
    groups = read_e2e(trainval)
    _, val_idx = split_by_group([mr for mr, _ in groups], fraction, seed)
    path = out / f"validation_seed{seed}_fraction{fraction:g}.csv"
    return ValidationSet(path, *_write_e2e(path, [groups[i] for i in val_idx]))


def check_validation_split(
    validation: ValidationSet, summary: dict[str, Any], run_dir: Path
) -> None:
    """ExperimentError unless the run in ``run_dir`` (its :func:`run_summary`) held out as many
    MRs and rows as ``validation``."""
    reported = summary.get("data")
    ours = {"validation_groups": validation.mrs, "validation_examples": validation.rows}
    if reported is not None and {k: reported[k] for k in ours} != ours:
        raise ExperimentError(
            f"{run_dir} held out {reported['validation_groups']} MRs "
            f"({reported['validation_examples']} rows) for validation, but "
            f"{validation.path.name} has {validation.mrs} ({validation.rows})"
            f": some rows were skipped (see its log); fix them, or set "
            f"select: validation_loss"
        )


def _run_process(args: list[str], log: Path) -> dict[str, float]:
    """Run ``python -m train.cli ARGS`` (output to ``log``); its peak RSS and wall time."""
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "train.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise ExperimentError(
            f"`lora-jax {' '.join(args)}` failed (exit status "
            f"{process.returncode}); its log is {log}:\n{tail}"
        )
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "wall_s": time.perf_counter() - start}


def train_run(
    cfg: ExperimentConfig,
    method: MethodSpec,
    learning_rate: float,
    data: Path,
    run_dir: Path,
    seed: int | None = None,
) -> tuple[dict[str, Any], bool]:
    """Train one (method, learning rate[, seed]) unless a finished run with this config exists.

    Returns the run's :func:`run_summary` and whether the finished run was reused.
    """
    wanted = run_config(cfg, method, learning_rate, data, run_dir, seed)
    reused = _train_unless_finished(wanted, run_dir, may_train=cfg.runs_from is None)
    return run_summary(run_dir), reused


def train_grid(
    cfg: ExperimentConfig, method: MethodSpec, data: Path, run_dir: Path, seed: int
) -> tuple[dict[float, dict[str, Any]], bool]:
    """Train every learning rate of ``method`` as the adapters of one run (module
    docstring, step 2) unless a finished run with this config exists.

    Returns each rate's :func:`run_summary` (of its adapter) and whether it was reused.
    """
    rates = method.learning_rates
    together = grid_overrides(rates, seed)
    wanted = run_config(cfg, method, rates[0], data, run_dir, together=together)
    reused = _train_unless_finished(wanted, run_dir, may_train=cfg.runs_from is None)
    return {lr: run_summary(run_dir, adapter=j) for j, lr in enumerate(rates)}, reused


def _train_unless_finished(wanted: Any, run_dir: Path, may_train: bool = True) -> bool:
    """Run ``lora-jax train`` on the RunConfig ``wanted`` unless ``run_dir`` holds its
    finished run (then True); a finished run of another config is an ExperimentError, and
    so is a missing one when not ``may_train`` (``runs_from``)."""
    finished = (run_dir / PROCESS_FILE).is_file() and all(
        (run_dir / directory / layout.ADAPTER_META_FILE).is_file()
        for directory in adapter_dirs(wanted)
    )
    if not finished and not may_train:
        raise ExperimentError(
            f"{run_dir} holds no finished run, and this experiment decodes the runs of "
            f"runs_from without training: finish the experiment that owns them first, or "
            f"drop runs_from to train the runs here"
        )
    if finished and load_config(run_dir / layout.CONFIG_FILE) != wanted:
        raise ExperimentError(
            f"{run_dir} holds a finished run with another config; the "
            f"experiment config changed. Use a new output_dir, or --fresh "
            f"to delete the old results"
        )
    if not finished:
        # the run directory is `lora-jax train`'s: marked as such before anything goes in
        rundir.claim(run_dir, layout.Kind.RUN, what="run directory")
        requested = save_config(wanted, run_dir / "requested.yaml")
        process = _run_process(["train", str(requested)], run_dir / LOG_FILE)
        (run_dir / PROCESS_FILE).write_text(json.dumps(process) + "\n")
    return finished


def _dir_bytes(path: Path) -> int:
    """What the files under ``path`` take, less lora-jax's ownership mark."""
    return sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != rundir.MARK_FILE
    )


def run_summary(run_dir: Path, adapter: int | None = None) -> dict[str, Any]:
    """Figures of a finished run: run_info, process peak RSS, step time, validation loss.

    ``adapter``: those of adapter j of a run of several (train/bank.py): its own records
    and adapter directory, and its share (1/k) of the run's parameter and optimizer-state
    counts; peak RSS and step time stay the run's, all adapters together
    (``trained_together`` says how many)."""
    info = json.loads((run_dir / layout.RUN_INFO_FILE).read_text())
    validation_split, train_split, directory = "validation", "train", layout.ADAPTER_DIR
    if adapter is not None:
        k = len(info["adapters"])
        validation_split, train_split = (adapter_split(s, adapter) for s in ("validation", "train"))
        directory = info["adapters"][adapter]["directory"]
        shares = ("trainable_params", "added_params", "optimizer_state_bytes")
        info |= {key: info[key] // k for key in shares} | {"trained_together": k}
    records = read_records(run_dir / layout.METRICS_FILE)
    validation = [r for r in records if r["split"] == validation_split]
    step_s = [r["step_s"] for r in records if r["split"] == train_split and "step_s" in r]
    return {
        **info,
        **json.loads((run_dir / PROCESS_FILE).read_text()),
        "adapter_bytes": _dir_bytes(run_dir / directory),
        # the first window holds the compilation: leave it out when there are others
        "step_s": float(np.median(step_s[1:] or step_s)) if step_s else None,
        "validation_loss_before": validation[0]["loss"] if validation else None,
        "validation_loss": validation[-1]["loss"] if validation else None,
        "steps": validation[-1]["step"] if validation else None,
    }


def eval_run(
    cfg: ExperimentConfig, target: Path, test_csv: Path, out: Path, *, every_mr: bool = False
) -> dict[str, Any]:
    """``lora-jax eval TARGET --data test.csv --out OUT`` unless done with the same options
    (``every_mr``: no ``eval.limit``)."""
    args = [
        "eval",
        str(target),
        "--data",
        str(test_csv),
        "--out",
        str(out),
        "--batch-size",
        str(cfg.eval.batch_size),
        "--max-new-tokens",
        str(cfg.eval.max_new_tokens),
    ]
    args += ["--greedy"] if cfg.eval.greedy else []
    args += ["--limit", str(cfg.eval.limit)] if cfg.eval.limit and not every_mr else []
    # what the outputs depend on: the arguments and the eval command's decoding defaults
    # (outputs decoded under other defaults, e.g. an older n-gram ban, are decoded again)
    key = {"args": args, "decoding": dataclasses.asdict(PAPER_DECODING)}
    done = out / EVAL_ARGS_FILE
    if not (
        done.is_file() and json.loads(done.read_text()) == key and (out / SCORES_FILE).is_file()
    ):
        rundir.claim(out, layout.Kind.EVAL, what="eval output directory")
        process = _run_process(args, out / LOG_FILE)
        done.write_text(json.dumps(key) + "\n")
        (out / PROCESS_FILE).write_text(json.dumps(process) + "\n")
    return {
        "scores": json.loads((out / SCORES_FILE).read_text()),
        "predictions": str(out / PREDICTIONS_FILE),
    }


def choose(candidates: dict[float, dict[str, Any]], select: str) -> float:
    """The learning rate whose run scores best on validation: the highest BLEU
    (``validation_bleu``; ties go to the lower loss) or the lowest final loss. A single
    candidate is chosen as it is."""
    if len(candidates) == 1:
        return next(iter(candidates))
    losses = {lr: c["validation_loss"] for lr, c in candidates.items()}
    if any(loss is None for loss in losses.values()):
        raise ExperimentError(
            "a run has no validation loss; set data.validation_fraction > 0 "
            "so learning rates can be chosen on validation data"
        )
    if select == "validation_bleu":
        return max(losses, key=lambda lr: (candidates[lr]["validation_bleu"], -losses[lr]))
    return min(losses, key=losses.get)


def run_experiment(cfg: ExperimentConfig, *, source: str, log=print) -> dict[str, Any]:
    """Steps 1-6 of the module docstring; returns what ``results.json`` holds."""
    out = rundir.claim(
        resolve_path(cfg.output_dir), layout.Kind.EXPERIMENT, what="experiment output_dir"
    )
    trainval, test, counts = split_test(cfg.data, cfg.test_fraction, cfg.seed, out)
    log(f"data: {counts}")
    runs = runs_source(cfg, out, (trainval, test))  # whose runs/ are trained or decoded
    if runs != out:
        log(f"decoding the runs of {runs} (runs_from)")
        trainval = runs / trainval.name  # the path those runs' configs name
    validation_sets: dict[tuple[int, float], ValidationSet] = {}  # one per (seed, fraction)
    rows = []
    for method in cfg.methods:
        row: dict[str, Any] = {"method": method.name, "overrides": list(method.overrides)}
        if method.learning_rates:
            # the rates of a method differ in nothing else: one seed, one validation split
            method_cfg = run_config(cfg, method, method.learning_rates[0], trainval, runs)
            split = (method_cfg.seed, method_cfg.data.validation_fraction)
            # one rate: nothing to choose, no validation decoding
            decode_validation = cfg.select == "validation_bleu" and len(method.learning_rates) > 1
            if decode_validation and split not in validation_sets:
                validation_sets[split] = validation_split(trainval, *split, out)
            candidates, targets = {}, {}
            together = (
                cfg.grid_in_one_process
                and method_cfg.method == "lora"
                and len(method.learning_rates) > 1
            )
            if together:
                grid_dir = runs / "runs" / method.name / "lr_grid"
                log(f"[{method.name}] learning rates {list(method.learning_rates)} together")
                grid, reused = train_grid(cfg, method, trainval, grid_dir, method_cfg.seed)
            for j, lr in enumerate(method.learning_rates):
                if together:
                    # the adapter directory is the run to decode; outputs go beside it
                    run_dir = grid_dir
                    eval_dir = out / grid_dir.relative_to(runs) / f"validation_eval_{j}"
                    targets[lr], candidates[lr] = grid_dir / adapter_dir_name(j), grid[lr]
                else:
                    log(f"[{method.name}] learning rate {lr:g}")
                    run_dir = runs / "runs" / method.name / f"lr_{lr:g}"
                    eval_dir = out / run_dir.relative_to(runs) / "validation_eval"
                    candidates[lr], reused = train_run(cfg, method, lr, trainval, run_dir)
                    targets[lr] = run_dir
                if decode_validation:
                    check_validation_split(validation_sets[split], candidates[lr], run_dir)
                    candidates[lr]["validation_bleu"] = eval_run(
                        cfg,
                        targets[lr],
                        validation_sets[split].path,
                        eval_dir,
                        every_mr=True,
                    )["scores"]["BLEU"]
                log(
                    f"[{method.name}] lr {lr:g}: validation loss "
                    f"{candidates[lr]['validation_loss']:.4f}"
                    + (
                        f", BLEU {candidates[lr]['validation_bleu']:.2f}"
                        if "validation_bleu" in candidates[lr]
                        else ""
                    )
                    + f"{' (finished run reused)' if reused else ''}"
                )
            chosen = choose(candidates, cfg.select)
            row |= {**candidates[chosen], "method": method.name}  # not run_info's method
            chosen_dir = targets[chosen]
            row |= {
                "learning_rate": chosen,
                "run_dir": str(chosen_dir),
                "seed": method_cfg.seed,
                "learning_rate_grid": {
                    f"{lr:g}": c["validation_loss"] for lr, c in candidates.items()
                },
                "learning_rate_grid_bleu": {
                    f"{lr:g}": c.get("validation_bleu") for lr, c in candidates.items()
                },
            }
            target = chosen_dir
        else:  # zero-shot: the base model as the shared overrides load it
            target = save_config(
                run_config(cfg, method, 0.0, trainval, out / method.name),
                out / method.name / layout.CONFIG_FILE,
            )
        log(f"[{method.name}] decoding {counts['test_mrs']} test MRs")
        row["served"] = str(target)
        row |= eval_run(cfg, target, test, out / "eval" / method.name)
        log(f"[{method.name}] {row['scores']}")
        if method.seeds:
            row |= seed_runs(cfg, method, row, trainval, test, out, runs, log)
        rows.append(row)
    trained = [r for r in rows if "base_params" in r]
    for row in rows:  # untrained rows: the base's figures, from any trained run
        if "base_params" not in row and trained:
            row |= {
                "base_params": trained[0]["base_params"],
                "trainable_params": 0,
                "validation_loss": trained[0]["validation_loss_before"],
            }
    if cfg.latency.new_tokens > 0:
        log(f"batch-1 latency of {len(rows)} rows, side by side")
        batch1_latency(cfg, rows, test, out)
    results = {
        "config": source,
        "experiment": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "data": counts,
        "machine": machine(),
        "rows": rows,
    }
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
    return results


def runs_source(cfg: ExperimentConfig, out: Path, split: Sequence[Path]) -> Path:
    """The directory whose ``runs/`` this experiment trains into, or only reads from:
    ``out``, or ``runs_from``, another experiment's output_dir split the same way (the
    files of our ``split``, :func:`split_test`'s, equal its files of those names, byte
    for byte).

    Raises ConfigError, one line, when ``runs_from`` is not such a directory."""
    if cfg.runs_from is None:
        return out
    runs = resolve_path(cfg.runs_from).absolute()
    if runs == out:
        raise ConfigError(
            f"runs_from {runs} is this experiment's own output_dir; drop runs_from to reuse "
            f"the runs there, or name another experiment's output_dir"
        )
    if not rundir.owned(runs, layout.Kind.EXPERIMENT):
        raise ConfigError(
            f"runs_from {runs} is not the output_dir of a lora-jax experiment; run that "
            f"experiment first, or set runs_from to its output_dir"
        )
    for ours in split:
        theirs = runs / ours.name
        if not theirs.is_file() or theirs.read_bytes() != ours.read_bytes():
            raise ConfigError(
                f"runs_from {runs} split the data differently ({ours.name} differs from "
                f"{ours}); its data, test_fraction and seed must be this "
                f"experiment's, or drop runs_from to train the runs here"
            )
    return runs


def batch1_latency(
    cfg: ExperimentConfig, rows: list[dict[str, Any]], test: Path, out: Path
) -> None:
    """Step 5: every row's batch-1 decoding latency, side by side in this process
    (studies/e2e/latency.py), on the first test MR; added to the rows as
    ``latency_ms_per_token`` and ``latency_vs_reference`` (to the ``reference`` row, else
    the first). Kept in ``latency.json``, reused while the rows and settings are the same."""
    served = {r["method"]: r["served"] for r in rows}
    reference = cfg.reference if cfg.reference in served else rows[0]["method"]
    spec = dataclasses.asdict(cfg.latency)
    path = out / LATENCY_FILE
    found = json.loads(path.read_text()) if path.is_file() else {}
    if found.get("served") != served or found.get("spec") != spec:
        targets = {name: latency_lib.as_served(load_target(t)) for name, t in served.items()}
        mr = read_e2e(test)[0][0]
        found = {"served": served} | latency_lib.measure(targets, mr, cfg.latency, reference)
        path.write_text(json.dumps(found, indent=1) + "\n")
    for row in rows:
        measured = found["rows"][row["method"]]
        row["latency_ms_per_token"] = measured["ms_per_token"]
        row["latency_vs_reference"] = measured["vs_reference"]
        row["latency_reference"] = reference
        row["latency_rounds"] = [len(found["valid_rounds"]), cfg.latency.rounds]


def seed_runs(
    cfg: ExperimentConfig,
    method: MethodSpec,
    row: dict[str, Any],
    trainval: Path,
    test: Path,
    out: Path,
    runs: Path,
    log=print,
) -> dict[str, Any]:
    """Train ``method.seeds`` at the chosen rate of ``row`` (under ``runs``: ``out``, or
    ``runs_from``, whose finished runs are then reused), decode the test MRs for each.

    Returns the row's new entries: ``seed_scores`` (run-config seed -> test scores, the
    chosen run's first), ``seed_validation_loss`` likewise, and ``scores``/``scores_sd``:
    every metric's mean and sample standard deviation across them (:func:`across_seeds`).
    """
    lr = row["learning_rate"]
    scores = {str(row["seed"]): row["scores"]}
    losses = {str(row["seed"]): row["validation_loss"]}
    for seed in method.seeds:
        log(f"[{method.name}] lr {lr:g}, seed {seed}")
        run_dir = runs / "runs" / method.name / f"lr_{lr:g}_seed{seed}"
        summary, reused = train_run(cfg, method, lr, trainval, run_dir, seed)
        scores[str(seed)] = eval_run(
            cfg, run_dir, test, out / "eval" / method.name / f"seed{seed}"
        )["scores"]
        losses[str(seed)] = summary["validation_loss"]
        log(
            f"[{method.name}] seed {seed}: {scores[str(seed)]}"
            f"{' (finished run reused)' if reused else ''}"
        )
    mean, sd = across_seeds(list(scores.values()))
    return {"seed_scores": scores, "seed_validation_loss": losses, "scores": mean, "scores_sd": sd}


def across_seeds(
    scores: Sequence[dict[str, float | None]],
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Per metric: the mean and the sample standard deviation (n - 1) over ``scores``, one
    dict per run; None for a metric some run lacks (METEOR without WordNet)."""
    mean, sd = {}, {}
    for name in scores[0]:
        values = [s.get(name) for s in scores]
        known = None not in values
        mean[name] = float(np.mean(values)) if known else None
        sd[name] = float(np.std(values, ddof=1)) if known and len(values) > 1 else None
    return mean, sd


# ---------------------------------------------------------------------------- report


def _mib(n: float | None) -> str:
    """Bytes in the largest unit that keeps the number >= 1 (B, KiB, MiB)."""
    if n is None:
        return "-"
    if n < 2**10:
        return f"{n:,.0f} B"
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _metric(row: dict[str, Any], name: str) -> str:
    """The metric on the paper's scale; with its standard deviation when over seeds."""
    value, sd = row.get("scores", {}).get(name), row.get("scores_sd", {}).get(name)
    scale = e2e_metrics.PAPER_SCALE[name]
    if value is None:
        return "null"
    return f"{value * scale:.2f}" + ("" if sd is None else f" ± {sd * scale:.2f}")


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The results table, metrics on the paper's scales (BLEU, METEOR, ROUGE-L x100), and
    the batch-1 latency columns when it was measured."""
    latency = any("latency_ms_per_token" in r for r in rows)
    reference = next((r["latency_reference"] for r in rows if "latency_reference" in r), "")
    lines = [
        "| method | lr | trainable params | % of base | saved on disk | optimizer state "
        "| peak RSS | s / step | val loss | BLEU | NIST | METEOR | ROUGE-L | CIDEr |"
        + (f" ms / token, batch 1 | vs {reference} |" if latency else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|---:|" if latency else ""),
    ]
    for r in rows:
        share = 100 * r["trainable_params"] / r["base_params"] if r.get("base_params") else None
        cells = [
            r["method"],
            f"{r['learning_rate']:g}" if "learning_rate" in r else "-",
            f"{r.get('trainable_params', 0):,}",
            "-" if share is None else f"{share:.3f}",
            _mib(r.get("adapter_bytes")),
            _mib(r.get("optimizer_state_bytes")),
            _mib(r.get("peak_rss_bytes")),
            "-" if r.get("step_s") is None else f"{r['step_s']:.2f}",
            "-" if r.get("validation_loss") is None else f"{r['validation_loss']:.3f}",
            *(_metric(r, m) for m in e2e_metrics.METRICS),
        ]
        if latency:
            cells += [
                f"{r['latency_ms_per_token']:.1f}" if "latency_ms_per_token" in r else "-",
                f"{r['latency_vs_reference']:.3f}" if "latency_vs_reference" in r else "-",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """PNG: each metric against trainable parameters (log axis), with a bar of one standard
    deviation for rows trained with several seeds; zero-shot as a line."""
    plt = pyplot()
    names = [
        m for m in e2e_metrics.METRICS if all(r.get("scores", {}).get(m) is not None for r in rows)
    ]
    figure, axes = plt.subplots(
        1, len(names), figsize=(3.2 * len(names), 3.4), dpi=100, squeeze=False
    )
    for ax, name in zip(axes[0], names, strict=True):
        scale = e2e_metrics.PAPER_SCALE[name]
        trained = [
            (r["scores"][name] + sign * (r.get("scores_sd", {}).get(name) or 0)) * scale
            for r in rows
            if r.get("trainable_params")
            for sign in (-1, 1)
        ]
        # the axis spans the trained methods, which differ by little; an untrained row far
        # below them would flatten them into one line, so it is then named, not drawn
        low, high = (min(trained), max(trained)) if trained else (0.0, 1.0)
        pad = 0.15 * (high - low) or 0.05 * abs(high) or 1.0
        ax.set_ylim(low - pad, high + pad)
        for r in rows:
            value = r["scores"][name] * scale
            if r.get("trainable_params"):
                sd = r.get("scores_sd", {}).get(name)
                ax.errorbar(
                    r["trainable_params"],
                    value,
                    fmt="o",
                    capsize=3,
                    yerr=None if sd is None else sd * scale,
                )
                ax.annotate(
                    r["method"],
                    (r["trainable_params"], value),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            elif low - pad <= value <= high + pad:
                ax.axhline(value, linestyle="--", color="grey", label=r["method"])
            else:
                ax.plot(
                    [],
                    [],
                    linestyle="--",
                    color="grey",
                    label=f"{r['method']}: {value:.2f} (off the axis)",
                )
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def report(results: dict[str, Any], cfg: ExperimentConfig, config_text: str, command: str) -> str:
    """docs/results.md: the table, the learning-rate choice, the machine, the config."""
    rows = results["rows"]
    data, machine = results["data"], results["machine"]
    lines = [
        REPORT_MARK + cfg.title,
        "",
        "Produced by",
        "",
        "```",
        command,
        "```",
        "",
        f"on {machine['cpu']} ({machine['cores']} cores; {machine['devices'][0]}), "
        f"versions {json.dumps(machine['versions'])}.",
        "",
        f"Data: {cfg.data} split by MR: {data['trainval_mrs']} MRs ({data['trainval_rows']} "
        f"rows) to train and validate on, {data['test_mrs']} MRs ({data['test_rows']} rows) "
        f"held out for the metrics"
        f"{f' (the first {cfg.eval.limit} decoded)' if cfg.eval.limit else ''}. Decoding: "
        f"{'greedy' if cfg.eval.greedy else 'beam search, 10 beams, length penalty 0.9'}"
        f", no 4-gram repeated within the output (the paper's ban; the MR's may be copied), "
        f"at most {cfg.eval.max_new_tokens} new tokens. Metrics: "
        f"studies/e2e/metrics.py, on the paper's scales (BLEU, METEOR, ROUGE-L x100).",
        "",
        *table(rows),
        "",
        "Columns: *trainable params* and *% of base* count what the optimizer updates; "
        "*saved on disk* is the run's adapter directory (for full fine-tuning: every "
        "parameter, i.e. a full checkpoint); *optimizer state* is AdamW's bytes; *peak "
        "RSS* is the training process's (model loading included); *s / step* the median "
        "wall-clock seconds per update; *val loss* the final validation loss in nats per "
        "target token (for zero-shot: before training).",
        *latency_note(rows),
        *together_note(rows),
        "",
        "![metrics vs trainable parameters](" + Path(cfg.plot).name + ")",
        "",
        "## Learning rates, chosen on the validation split",
        "",
        "Each method trains at every rate of its grid; the rate kept is the one with "
        + (
            "the highest BLEU of its greedy/beam outputs on the validation MRs (decoded "
            "as the test MRs are; ties go to the lower loss)"
            if cfg.select == "validation_bleu"
            else "the lowest final validation loss"
        )
        + ". Validation MRs are disjoint from training and test MRs. A method with one "
        "rate keeps it: nothing is chosen, and its validation MRs are not decoded.",
        "",
        "| method | validation loss per learning rate | validation BLEU per learning rate "
        "| chosen |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if "learning_rate_grid" in r:
            grid = ", ".join(f"{lr}: {loss:.4f}" for lr, loss in r["learning_rate_grid"].items())
            bleu = ", ".join(
                f"{lr}: {b:.2f}"
                for lr, b in r.get("learning_rate_grid_bleu", {}).items()
                if b is not None
            )
            lines.append(
                f"| {r['method']} | {grid} | {bleu or '-'} | {r['learning_rate']:g}"
                f"{_edge(r['learning_rate'], r['learning_rate_grid'])} |"
            )
    lines += seeds_section(rows)
    lines += [
        "",
        "## Ratios",
        "",
        *ratios(rows, cfg.reference),
        "",
        "## The experiment config",
        "",
        f"`{results['config']}`:",
        "",
        "```yaml",
        config_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def latency_note(rows: list[dict[str, Any]]) -> list[str]:
    """A sentence on the latency columns, when they were measured (batch1_latency)."""
    measured = next((r for r in rows if "latency_rounds" in r), None)
    if measured is None:
        return []
    valid, rounds = measured["latency_rounds"]
    return [
        "",
        "*ms / token, batch 1*: each row's model as it would serve (LoRA merged into W; "
        "adapters and prefixes through their forward) decoding the first test MR greedily "
        "at batch 1, all rows side by side in one process, their order rotated over "
        f"{rounds} rounds ({valid} in one CPU regime, by matmul probes; studies/e2e/"
        f"latency.py); *vs {measured['latency_reference']}*: the median per-round ratio.",
    ]


def together_note(rows: list[dict[str, Any]]) -> list[str]:
    """A sentence on rows whose learning rates trained in one process (grid_in_one_process)."""
    together = [r["method"] for r in rows if r.get("trained_together")]
    if not together:
        return []
    return [
        "",
        f"{', '.join(together)}: the learning rates trained together, as the adapters of "
        "one process (grid_in_one_process); the parameter and optimizer-state columns are "
        "one adapter's, *peak RSS* and *s / step* the process's, for all its adapters.",
    ]


def seeds_section(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: every seed's test BLEU and validation loss, for rows trained with several."""
    seeded = [r for r in rows if "seed_scores" in r]
    if not seeded:
        return []
    lines = [
        "",
        "## Seeds",
        "",
        "Rows with several seeds were trained again at their chosen rate with each other "
        "run-config `seed` (which draws the train/validation split, the data order, the "
        "initialisation and the dropout); the table gives the mean ± the sample standard "
        "deviation of their test metrics, and the other columns are the chosen run's.",
        "",
        "| method | test BLEU per seed | validation loss per seed |",
        "|---|---|---|",
    ]
    for r in seeded:
        bleu = ", ".join(f"{seed}: {s['BLEU']:.2f}" for seed, s in r["seed_scores"].items())
        loss = ", ".join(f"{seed}: {v:.4f}" for seed, v in r["seed_validation_loss"].items())
        lines.append(f"| {r['method']} | {bleu} | {loss} |")
    return lines


def _edge(chosen: float, grid: dict[str, float]) -> str:
    """A warning when the chosen rate is the grid's largest or smallest (of several)."""
    rates = sorted(float(lr) for lr in grid)
    if len(rates) < 2:
        return ""
    if chosen == rates[-1]:
        return " (the largest tried: a larger rate may be better)"
    return " (the smallest tried: a smaller rate may be better)" if chosen == rates[0] else ""


def ratios(rows: list[dict[str, Any]], reference: str = "full") -> list[str]:
    """The ``reference`` row (full fine-tuning) over each trained row: saved bytes,
    optimizer-state bytes and peak RSS; BLEU gaps."""
    full = next((r for r in rows if r.get("method") == reference), None)
    if full is None:
        return [f"(no row named `{reference}`, the experiment's `reference`)"]
    lines = []
    for r in rows:
        if r is full or not r.get("trainable_params") or not r.get("adapter_bytes"):
            continue
        gap = r["scores"]["BLEU"] - full["scores"]["BLEU"]
        runs = [len(x.get("seed_scores", ())) or 1 for x in (r, full)]
        lines.append(
            f"- {r['method']}: saved "
            f"{_times(full['adapter_bytes'], r['adapter_bytes'], 'smaller', 'larger')}, "
            "optimizer state "
            f"{_times(full['optimizer_state_bytes'], r['optimizer_state_bytes'], 'smaller', 'larger')}, "
            f"peak RSS {_times(full['peak_rss_bytes'], r['peak_rss_bytes'], 'lower', 'higher')}, "
            f"BLEU {gap:+.2f} vs {'full fine-tuning' if reference == 'full' else reference}"
            + ("" if runs == [1, 1] else f" (means of {runs[0]} and {runs[1]} runs)")
            + paired_difference(r, full)
        )
    return lines


def _times(reference: float, value: float, less: str, more: str) -> str:
    """How many times ``value`` is below ``reference`` ("290x smaller", "1.30x lower"), or
    above it; "the same" within 0.5 %. Below 10x with two decimals, which "1x" would hide."""
    ratio = reference / value
    if abs(ratio - 1) < 0.005:
        return "the same"
    word = less if ratio >= 1 else more
    times = max(ratio, 1 / ratio)
    return f"{times:,.{0 if times >= 10 else 2}f}x {word}"


def paired_difference(row: dict[str, Any], reference: dict[str, Any]) -> str:
    """The BLEU difference ``row`` − ``reference`` paired by run-config seed (both trained
    with the same seeds, >= 2): each seed's, their mean and its standard error (the
    sample standard deviation of the differences over sqrt(n)); "" otherwise. Pairing
    removes what a seed does to both (its split, its data order) from the comparison."""
    mine, theirs = row.get("seed_scores", {}), reference.get("seed_scores", {})
    if len(mine) < 2 or set(mine) != set(theirs):
        return ""
    seeds = sorted(mine, key=int)
    diffs = [mine[s]["BLEU"] - theirs[s]["BLEU"] for s in seeds]
    se = float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs))
    each = ", ".join(f"{s}: {d:+.2f}" for s, d in zip(seeds, diffs, strict=True))
    return f"; paired by seed ({each}): {float(np.mean(diffs)):+.2f} ± {se:.2f} (SE)"


def check_outputs(cfg: ExperimentConfig, *, fresh: bool = False) -> None:
    """Before anything is written or deleted: the data exists, the output directory can be
    claimed (or, with ``fresh``, deleted: only an experiment's own, marked one), and the
    report and plot paths hold nothing but an earlier report and plot.

    Raises ConfigError or rundir.DirectoryError, one line each; changes nothing.
    """
    data = resolve_path(cfg.data)
    if not data.is_file():
        raise ConfigError(
            f"experiment data {data} does not exist (key 'data'); point it at an "
            f"E2E CSV with columns mr, ref"
        )
    out = rundir.check_writable(resolve_path(cfg.output_dir), "experiment output_dir")
    if out.is_dir() and any(out.iterdir()) and not rundir.owned(out, layout.Kind.EXPERIMENT):
        mark = rundir.read_mark(out)
        whose = (
            f"it is a lora-jax {mark['kind']!r} directory"
            if mark
            else f"it was not created by lora-jax experiment (no {rundir.MARK_FILE} in it)"
        )
        action = (
            "--fresh deletes only an experiment's own output_dir"
            if fresh
            else "the experiment writes only into its own output_dir"
        )
        raise rundir.DirectoryError(
            f"experiment output_dir {out} is not empty and {whose}; "
            f"nothing was changed ({action}). Set output_dir to a new or "
            f"empty directory"
        )
    report_path, plot_path = resolve_path(cfg.report), resolve_path(cfg.plot)
    if report_path == plot_path:
        raise ConfigError(f"report and plot are the same file {report_path}; give each its own")
    for key, path, ours in (("report", report_path, _is_report), ("plot", plot_path, _is_plot)):
        rundir.check_writable(path.parent, f"the directory of {key}")
        if path.exists() and not (path.is_file() and ours(path)):
            raise ConfigError(
                f"{key} {path} exists and is not a {key} written by lora-jax "
                f"experiment; it is left as it is. Set {key} to another path, or "
                f"move that file away"
            )


def _is_report(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(REPORT_MARK.encode())) == REPORT_MARK.encode()


def _is_plot(path: Path) -> bool:
    """A PNG that Matplotlib wrote (its Software text chunk comes first)."""
    with path.open("rb") as f:
        head = f.read(256)
    return head.startswith(b"\x89PNG\r\n\x1a\n") and b"Matplotlib" in head


def fresh_start(cfg: ExperimentConfig) -> None:
    """Delete the experiment's output_dir if it carries the experiment mark (else nothing
    of it: :func:`check_outputs` refuses an unmarked, non-empty one first)."""
    out = resolve_path(cfg.output_dir)
    if rundir.owned(out, layout.Kind.EXPERIMENT):  # the mark: this command created it
        shutil.rmtree(out)


def run_command(args: argparse.Namespace) -> int:
    """``lora-jax experiment`` (arguments: studies/e2e/commands.py)."""
    if args.fresh and args.methods:
        raise ConfigError(
            "--fresh deletes the whole output_dir, the finished runs of methods --methods "
            "leaves out too; drop --methods to start the experiment over, or --fresh to keep them"
        )
    cfg = load_experiment(args.config, args.overrides, args.methods or ())
    check_outputs(cfg, fresh=args.fresh)
    if args.fresh:
        fresh_start(cfg)
    results = run_experiment(cfg, source=args.config)
    command = " ".join(
        ["lora-jax experiment", args.config, *args.overrides]
        + (["--methods", *args.methods] if args.methods else [])
    )
    config_text = Path(args.config).read_text()
    if args.overrides:
        config_text += f"\n# with the overrides {' '.join(args.overrides)}\n"
    report_path = resolve_path(cfg.report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report(results, cfg, config_text, command))
    plot(results["rows"], resolve_path(cfg.plot))
    print("\n".join(table(results["rows"])))
    print(
        f"\nwritten: {report_path}, {resolve_path(cfg.plot)}, "
        f"{resolve_path(cfg.output_dir) / RESULTS_FILE}"
    )
    return 0
