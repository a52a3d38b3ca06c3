"""The study's commands, ``lora-jax eval`` and ``lora-jax experiment`` (E2E) and ``lora-jax
analyze`` (the paper's §7): their arguments here (this module imports nothing heavy, so
``--help`` is instant); the work in evaluation.py, experiment.py and train/analyze.py (it
reads any LoRA adapter, so it is the pipeline's), imported when a command runs
(train/cli.py)."""

from __future__ import annotations

import argparse

from studies.e2e.decoding import PAPER_DECODING
from train.cli import Command


def eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "targets",
        nargs="+",
        metavar="CONFIG_OR_RUN_DIR",
        help="YAML run config (its base model), run/adapter directory (LoRA "
        "unmerged), or a model directory such as lora-jax merge's output; several LoRA "
        "run/adapter directories of one base decode together, each scored on its own",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="E2E CSV with columns mr, ref (several rows per MR)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="write predictions.txt, scores.json and scores.md here"
    )
    beams = parser.add_mutually_exclusive_group()
    beams.add_argument("--greedy", action="store_true", help="one beam, for quick runs")
    beams.add_argument("--num-beams", type=int, default=PAPER_DECODING.num_beams, metavar="N")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N distinct MRs")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="MRs per batch")
    parser.add_argument(
        "--max-new-tokens", type=int, default=PAPER_DECODING.max_new_tokens, metavar="N"
    )


def experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML, e.g. configs/experiments/e2e_table.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides of the experiment config, e.g. eval.limit=20",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="delete the experiment's output_dir first, only if lora-jax "
        "experiment created it (else finished runs are reused and "
        "interrupted ones resume)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME",
        help="run and report only these of the config's methods (e.g. one row of a sweep); "
        "the others' finished runs stay for a later run of them all",
    )


def analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "adapters",
        nargs="+",
        metavar="ADAPTER_DIR",
        help="LoRA run or adapter directories; two or more are also compared pairwise "
        "(e.g. rank 8 against rank 64, or two seeds)",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="write analysis.json, analysis.md, heat maps"
    )
    parser.add_argument(
        "--draws",
        type=int,
        metavar="N",
        help="random direction pairs averaged for the 'random' column "
        "(default: lora_jax.analysis.RANDOM_DRAWS)",
    )
    parser.add_argument("--seed", type=int, default=0, help="of the random directions")
    parser.add_argument(
        "--skip-base-check",
        action="store_true",
        help="analyse an adapter even if it records a base with other weights",
    )


COMMANDS = {
    "eval": Command(
        "decode the MRs of an E2E CSV and score them (BLEU, NIST, METEOR, ROUGE-L, CIDEr)",
        eval_arguments,
        "studies.e2e.evaluation:run_command",
    ),
    "experiment": Command(
        "train and evaluate several methods on E2E and write the comparison table",
        experiment_arguments,
        "studies.e2e.experiment:run_command",
    ),
    "analyze": Command(
        "the LoRA paper's section 7 analysis of adapters: ΔW against W, subspace similarity",
        analyze_arguments,
        "train.analyze:run_analyze",
    ),
}
