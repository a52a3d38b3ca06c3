"""The ``lora-jax`` command line: ``lora-jax <command> ...``.

    lora-jax train CONFIG [key=value ...] [--force-resume] [--fresh] [--stop-after N]
                          [--coordinator HOST:PORT --num-processes N --process-id I]
    lora-jax plan CONFIG [key=value ...] (--topology NAME | --devices N) [--search] [--json OUT]
    lora-jax merge | export | import-peft ...     (train/export.py)
    lora-jax eval | experiment ...                (the E2E study, studies/e2e/)

The command line is assembled from command tables: a ``COMMANDS`` dict (name ->
:class:`Command`) in each module of :data:`TABLES`, this one's (the pipeline's) and each
study's. A table's module imports nothing heavy, and a command's ``run`` names its
function as ``"module:function"``, imported only when that command runs: ``lora-jax
--help`` and every ``--help`` answer without importing JAX. The study's table is named
here by module, never imported by the pipeline's code.

A user error (train/errors.py ``UserError``, and the library's and models' own file
errors) is one line on stderr and exit status 2; ``--debug`` shows its traceback. Ctrl-C
is exit status 130.

Multi-process runs start one ``lora-jax`` per process with the same arguments plus
``--coordinator`` (process 0's address), ``--num-processes`` and ``--process-id``;
they call ``jax.distributed.initialize`` (with gloo collectives on CPU) before any
other JAX call.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TABLES = ("train.cli", "studies.e2e.commands")  # modules with a COMMANDS table, in order
INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT), as a shell reports it
# Errors of the layers below train/ whose messages name the fix: (module, class name).
LIBRARY_ERRORS = (
    ("lora_jax.peft", "PeftFormatError"),
    ("models.loaders.checkpoint", "ModelFileError"),
    ("models.gguf_export", "GGUFExportError"),
)


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: str  # "module:function": takes the parsed arguments, returns the exit status


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process (one lora-jax per process)")
    group.add_argument(
        "--coordinator", metavar="HOST:PORT", help="address of process 0; enables jax.distributed"
    )
    group.add_argument("--num-processes", type=int, default=1)
    group.add_argument("--process-id", type=int, default=0)


def initialize_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` when ``--coordinator`` is given (CPU: gloo)."""
    if args.coordinator is None:
        return
    import jax

    if jax.config.jax_platforms in (None, "", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        args.coordinator, num_processes=args.num_processes, process_id=args.process_id
    )


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config, e.g. configs/e2e_lora.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. lora.rank=4 data.path=/x.csv",
    )


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)
    parser.add_argument(
        "--force-resume",
        action="store_true",
        help="resume from the latest checkpoint even if the config changed",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over: empty the run directory first (only one lora-jax "
        "created; anything else is refused)",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="STEPS",
        help="stop (with a checkpoint) after this many updates; rerun to resume",
    )
    add_distributed_arguments(parser)


def run_train(args: argparse.Namespace) -> int:
    """``lora-jax train``: prints validation losses, samples and the run directory."""
    from train.config import load_config

    cfg = load_config(args.config, args.overrides)
    initialize_distributed(args)
    import jax

    from train.run import RunStopped, train  # after jax.distributed.initialize

    try:
        result = train(
            cfg, force_resume=args.force_resume, stop_after=args.stop_after, fresh=args.fresh
        )
    except RunStopped as stopped:
        if jax.process_index() == 0:
            print(f"lora-jax train: {stopped} (run directory {stopped.run_dir})", file=sys.stderr)
        return INTERRUPTED
    if jax.process_index() != 0:
        return 0
    for adapter in result.adapters:  # several when lora.num_adapters > 1
        before, after = adapter.validation_before, adapter.validation_after
        if before and after:
            which = f" of {adapter.directory.name} (lr {adapter.learning_rate:g})"
            print(
                f"\nvalidation loss{which if len(result.adapters) > 1 else ''} (nats/token): "
                f"before {before['loss']:.4f}  after {after['loss']:.4f}   perplexity "
                f"{before['perplexity']:.2f} -> {after['perplexity']:.2f}"
            )
    for i, sample in enumerate(result.samples, start=1):
        print(
            f"\n[{i}] prompt:    {' '.join(sample.prompt.split())}\n"
            f"    generated: {sample.generated}\n    reference: {sample.reference}"
        )
    print(f"\nrun directory: {result.run_dir} (step {result.step})")
    return 0


def _adapter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="RUN_OR_ADAPTER_DIR")
    parser.add_argument("--out", required=True, metavar="DIR")
    _skip_base_check_argument(parser)


def _skip_base_check_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--skip-base-check",
        action="store_true",
        help="apply the adapter even if it records a base with other weights",
    )


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    _adapter_arguments(parser)
    parser.add_argument(
        "--base-only",
        action="store_true",
        help="write the adapter's base model alone (the transformers base of a GGUF model, "
        "for --base-model-name-or-path of a PEFT export)",
    )
    parser.add_argument(
        "--orbax", action="store_true", help="also write the merged params as an orbax tree"
    )


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="RUN_OR_ADAPTER_DIR")
    parser.add_argument(
        "--out", required=True, metavar="DIR_OR_FILE", help="peft: a directory; gguf: a file"
    )
    _skip_base_check_argument(parser)
    parser.add_argument("--format", required=True, choices=["peft", "gguf"])
    parser.add_argument(
        "--base-model-name-or-path",
        metavar="PATH_OR_ID",
        help="peft: the base transformers loads the adapter onto (default: the base's "
        "checkpoint directory; for a GGUF base, one written by lora-jax merge --base-only)",
    )
    parser.add_argument(
        "--serving-safe",
        action="store_true",
        help="peft: one rank and alpha, scales folded into lora_B, for engines that take "
        "one scale per adapter (vLLM, TensorRT-LLM)",
    )


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--topology",
        metavar="NAME",
        help="a TPU slice as jax.experimental.topologies names it: v5e:16x16, v5p:4x4x8, v6e:8x8",
    )
    target.add_argument("--devices", type=int, metavar="N", help="N host CPU devices")
    parser.add_argument(
        "--search",
        action="store_true",
        help="also compile meshes, sharding policies, remat and micro-batching; rank those "
        "that fit",
    )
    parser.add_argument("--json", metavar="OUT", help="write the plans as JSON (a new file)")


def _import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("peft_dir", metavar="PEFT_DIR")
    parser.add_argument("--model", required=True, help="the base: a preset or checkpoint path")
    parser.add_argument("--out", required=True, metavar="ADAPTER_DIR")
    _skip_base_check_argument(parser)


COMMANDS: dict[str, Command] = {
    "train": Command(
        "fine-tune a model (LoRA, full or BitFit) as a config says",
        _train_arguments,
        "train.cli:run_train",
    ),
    "merge": Command(
        "merge an adapter into its base: a Hugging Face checkpoint",
        _merge_arguments,
        "train.export:run_merge",
    ),
    "export": Command(
        "export an adapter as PEFT or llama.cpp GGUF",
        _export_arguments,
        "train.export:run_export",
    ),
    "plan": Command(
        "compile the train step for a TPU slice or N devices, without weights: memory, "
        "FLOPs, collectives, step-time bound per device",
        _plan_arguments,
        "train.plan:run_command",
    ),
    "import-peft": Command(
        "convert a PEFT LoRA adapter into a lora-jax adapter directory",
        _import_arguments,
        "train.export:run_import",
    ),
}


def commands() -> dict[str, Command]:
    """Every command of every table in :data:`TABLES`."""
    table: dict[str, Command] = {}
    for module in TABLES:
        table.update(importlib.import_module(module).COMMANDS)
    return table


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lora-jax", description="LoRA fine-tuning in JAX")
    top.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error instead of its one line",
    )
    subparsers = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in commands().items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.arguments(sub)
        sub.set_defaults(run=command.run)
    return top


def _function(reference: str) -> Callable[[argparse.Namespace], int]:
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def is_user_error(error: BaseException) -> bool:
    """Does ``error``'s message name the problem and the fix (no traceback wanted)?

    The lower layers' error classes are looked up only where their module is loaded
    already: an error cannot be of a class that was never imported.
    """
    from train.errors import UserError

    if isinstance(error, (UserError, FileNotFoundError)):
        return True
    loaded = [
        getattr(sys.modules[module], name)
        for module, name in LIBRARY_ERRORS
        if module in sys.modules
    ]
    return isinstance(error, tuple(loaded))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lora-jax`` console script; returns the exit status."""
    top = parser()
    args, extra = top.parse_known_args(argv)
    # key=value overrides may also follow the flags (argparse stops a positional list there)
    if extra and hasattr(args, "overrides") and all("=" in x and x[0] != "-" for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(sys.stdout, "reconfigure"):  # progress reaches a log file as it happens
        sys.stdout.reconfigure(line_buffering=True)
    try:
        return _function(args.run)(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            f"lora-jax {args.command}: interrupted; what was written before stays (a train "
            f"run resumes from its last checkpoint when rerun)",
            file=sys.stderr,
        )
        return INTERRUPTED
    except Exception as e:
        if args.debug or not is_user_error(e):
            raise
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(f"lora-jax {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
