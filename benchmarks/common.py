"""What every benchmark records beside its figures: the machine, the versions, the CPU regime
(``matmul_rate`` / ``same_regime``, from train/machine.py: studies/ probes it too)."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import jax

from train.machine import matmul_rate, same_regime  # noqa: F401 (the benchmarks' probe)


def command(module: str, argv: list[str] | None = None) -> str:
    """The command line of a benchmark run (`argv` as given to its `main`, else sys.argv)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def parse_args(parser, argv: list[str] | None, quick: dict):
    """`parser`'s arguments plus `--quick`, which replaces them with `quick` (a smoke check)."""
    parser.add_argument("--quick", action="store_true", help=f"a smoke check: {quick}")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(quick)
    return args


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table; `columns` are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    cells += [
        [format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def peak_bytes(stats) -> int:
    """XLA's peak for a compiled program (`compiled.memory_analysis()`): arguments, outputs
    and temporaries, less the outputs that alias (donated) arguments."""
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def timed_rounds(runs: dict, rows: dict, rounds: int, steps: int) -> None:
    """Time train steps side by side: `runs[name] = [jitted, args]` where ``jitted(*args)``
    returns (loss, *the first len(new) args for the next step); in each of `rounds` rounds
    (their order rotated) every run takes `steps` steps. Appends each step's seconds to
    ``rows[name]["times"]`` and the matmul probes before and after its round to
    ``rows[name]["probes"]``; leaves ``runs[name][1]`` at the last step's args."""
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            jitted, step_args = runs[name]
            before = matmul_rate()
            for _ in range(steps):
                start = time.perf_counter()
                loss, *new = jitted(*step_args)
                jax.block_until_ready(loss)
                rows[name]["times"].append(time.perf_counter() - start)
                step_args = (*new, *step_args[len(new) :])
            runs[name][1] = step_args
            rows[name]["probes"].append((before, matmul_rate()))
