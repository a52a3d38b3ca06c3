"""The ``lora-jax`` command line: ``lora-jax <command> ...``.

    lora-jax train CONFIG [key=value ...] [--force-resume] [--fresh] [--stop-after N]
                          [--coordinator HOST:PORT --num-processes N --process-id I]

Commands live in :data:`COMMANDS` (name -> :class:`Command`); a new one (``eval``,
``merge``, ``export``) adds an entry with its own ``add_arguments`` and ``run``.

Multi-process runs start one ``lora-jax`` per process with the same arguments plus
``--coordinator`` (process 0's address), ``--num-processes`` and ``--process-id``;
they call ``jax.distributed.initialize`` (with gloo collectives on CPU) before any
other JAX call.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax

from lora_jax.peft import PeftFormatError
from models.loaders.checkpoint import ModelFileError
from train.adapter import AdapterError
from train.checkpoint import CheckpointError
from train.config import ConfigError, load_config
from train.data import DataError
from train.e2e_eval import COMMAND as EVAL_COMMAND
from train.experiment import COMMAND as EXPERIMENT_COMMAND
from train.experiment import ExperimentError
from train.export import SUBCOMMANDS as EXPORT_COMMANDS
from train.metrics import MetricsFileError
from train.rundir import DirectoryError, DiskFullError

# Errors whose message already says what is wrong and how to fix it: one line, exit
# status 2, no traceback (``--debug`` shows it).
USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelFileError, AdapterError,
               FloatingPointError, FileNotFoundError, PeftFormatError, ExperimentError,
               DirectoryError, DiskFullError, MetricsFileError)
INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT), as a shell reports it


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process (one lora-jax per process)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0; enables jax.distributed")
    group.add_argument("--num-processes", type=int, default=1)
    group.add_argument("--process-id", type=int, default=0)


def initialize_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` when ``--coordinator`` is given (CPU: gloo)."""
    if args.coordinator is None:
        return
    if jax.config.jax_platforms in (None, "", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config, e.g. configs/e2e_lora.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. lora.rank=4 data.path=/x.csv")
    parser.add_argument("--force-resume", action="store_true",
                        help="resume from the latest checkpoint even if the config changed")
    parser.add_argument("--fresh", action="store_true",
                        help="start over: empty the run directory first (only one lora-jax "
                             "created; anything else is refused)")
    parser.add_argument("--stop-after", type=int, metavar="STEPS",
                        help="stop (with a checkpoint) after this many updates; rerun to resume")
    add_distributed_arguments(parser)


def _train(args: argparse.Namespace) -> int:
    from train.run import RunStopped, train  # after jax.distributed.initialize

    cfg = load_config(args.config, args.overrides)
    initialize_distributed(args)
    try:
        result = train(cfg, force_resume=args.force_resume, stop_after=args.stop_after,
                       fresh=args.fresh)
    except RunStopped as stopped:
        if jax.process_index() == 0:
            print(f"lora-jax train: {stopped} (run directory {stopped.run_dir})",
                  file=sys.stderr)
        return INTERRUPTED
    if jax.process_index() != 0:
        return 0
    before, after = result.validation_before, result.validation_after
    if before and after:
        print(f"\nvalidation loss (nats/token): before {before['loss']:.4f}  after "
              f"{after['loss']:.4f}   perplexity {before['perplexity']:.2f} -> "
              f"{after['perplexity']:.2f}")
    for i, sample in enumerate(result.samples, start=1):
        print(f"\n[{i}] prompt:    {' '.join(sample.prompt.split())}\n"
              f"    generated: {sample.generated}\n    reference: {sample.reference}")
    print(f"\nrun directory: {result.run_dir} (step {result.step})")
    return 0


COMMANDS: dict[str, Command] = {
    "train": Command("fine-tune a model (LoRA, full or BitFit) as a config says",
                     _train_arguments, _train),
    **{name: Command(*spec) for name, spec in EXPORT_COMMANDS.items()},  # merge, export, import-peft
    "eval": Command(*EVAL_COMMAND),
    "experiment": Command(*EXPERIMENT_COMMAND),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lora-jax", description="LoRA fine-tuning in JAX")
    top.add_argument("--debug", action="store_true",
                     help="show the full traceback of an error instead of its one line")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lora-jax`` console script; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(f"lora-jax {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"lora-jax {args.command}: interrupted; what was written before stays (a train "
              f"run resumes from its last checkpoint when rerun)", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
