"""LoRA vs full fine-tuning of SmolLM2-135M through the real training pipeline.

    python -m benchmarks.train_pipeline                     # 2 rounds, 6 updates per run
    python -m benchmarks.train_pipeline --rounds 1 --steps 3   # a quick check

Each run is `train.run.train` (what `lora-jax train` calls) on configs/e2e_lora.yaml or
configs/e2e_full.yaml, cut to `--steps` updates with one validation batch before and
after, no samples, no TensorBoard and a checkpoint only at the end, in a fresh
subprocess, so its peak RSS (`os.wait4`'s `ru_maxrss` of the child: the whole process,
model loading, compilation and the final checkpoint included) is its own. The methods
alternate in order over rounds, and a numpy matmul probe before and after each run
records the CPU regime.

Throughput comes from the run's own `metrics.jsonl` (`tokens_per_s`: non-padding tokens
per second of the training loop, data and host transfer included); the first update
(compilation) is left out. Target tokens (those with a loss) per second use the same
step times, with each step's target count replayed from the data stream. The XLA
figure is the compiled train step's own accounting (arguments + outputs + temporaries
− donated aliases), read from a persistent-cache hit after the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from train.machine import machine

METHODS = {"lora": "configs/e2e_lora.yaml", "full": "configs/e2e_full.yaml"}


def overrides(steps: int, output_dir: Path, extra: list[str]) -> list[str]:
    """The config overrides of a benchmark run: `steps` updates, everything else minimal."""
    return [
        f"output_dir={output_dir}",
        f"optim.max_steps={steps}",
        "eval.every_steps=0",
        "eval.num_batches=1",
        "eval.samples=0",
        "checkpoint.every_steps=0",
        "checkpoint.async_save=false",
        "logging.every_steps=1",
        "logging.tensorboard=false",
        *extra,
    ]


def child(method: str, steps: int, output_dir: Path, extra: list[str]) -> dict:
    """One run in this process; returns its figures (see the module docstring)."""
    import resource

    import jax

    from benchmarks.train_step import peak_bytes
    from train import layout, run
    from train import mesh as mesh_lib
    from train.config import load_config
    from train.metrics import read_records

    jax.config.update("jax_compilation_cache_dir", str(output_dir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cfg = load_config(METHODS[method], overrides(steps, output_dir, extra))
    setups = []  # train() builds its Setup inside; keep it for the step's memory analysis
    real_setup = run.setup
    run.setup = lambda *args, **kwargs: setups.append(real_setup(*args, **kwargs)) or setups[0]
    start = time.perf_counter()
    run.train(cfg, log=lambda _: None)
    run_s = time.perf_counter() - start
    rss_after_run = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    s = setups[0]

    accum = cfg.optim.grad_accum_steps
    stream = s.stream()  # the same batches again, for their token counts
    counts_Sx2 = np.array(
        [
            [int((b["segment_ids"] > 0).sum()), int(b["loss_mask"][:, 1:].sum())]
            for b in (next(stream) for _ in range(steps * accum))
        ]
    )
    counts_Sx2 = counts_Sx2.reshape(steps, accum, 2).sum(axis=1)
    records = [r for r in read_records(output_dir / layout.METRICS_FILE) if r["split"] == "train"]
    step_s_S = counts_Sx2[:, 0] / np.array([r["tokens_per_s"] for r in records])
    timed = slice(1, None)  # the first update compiles

    def spec(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    batch_sh = mesh_lib.batch_sharding(s.mesh, 3)
    batch_KxBxL = {
        k: jax.ShapeDtypeStruct(
            (accum, cfg.data.batch_size, cfg.data.max_length), np.int32, sharding=batch_sh
        )
        for k in ("input_ids", "segment_ids", "positions", "loss_mask")
    }
    xla_peak = peak_bytes(
        s.step_fn, (jax.tree.map(spec, s.state), jax.tree.map(spec, s.frozen), batch_KxBxL)
    )
    seconds = step_s_S[timed].sum()
    return {
        "method": method,
        "model": cfg.model.name,
        "run_s": run_s,
        "trainable_params": sum(x.size for x in jax.tree.leaves(s.state["params"])),
        "total_params": sum(x.size for x in jax.tree.leaves(s.base)),
        "step_s": step_s_S.tolist(),
        "step_s_median": float(np.median(step_s_S[timed])),
        "tokens_per_s": float(counts_Sx2[timed, 0].sum() / seconds),
        "target_tokens_per_s": float(counts_Sx2[timed, 1].sum() / seconds),
        "rss_after_run_bytes": rss_after_run,
        "xla_step_peak_bytes": xla_peak,
        "losses": [r["loss"] for r in records],
    }


def spawn(method: str, steps: int, output_dir: Path, extra: list[str]) -> dict:
    """`child` in a fresh interpreter; adds its peak RSS (`ru_maxrss` from `os.wait4`)."""
    output_dir.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "benchmarks.train_pipeline",
        "--child",
        method,
        "--steps",
        str(steps),
        "--output-dir",
        str(output_dir),
    ]
    command += [f"--set={item}" for item in extra]
    log = output_dir / "child.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"the {method} run exited with {process.returncode}:\n{tail}")
    result = json.loads((output_dir / "result.json").read_text())
    return result | {"peak_rss_bytes": usage.ru_maxrss * 1024}


def summarise(method: str, runs: list[dict], probes: list[tuple[float, float]]) -> dict:
    """One table row: medians over rounds (peak RSS: the largest)."""
    return {
        "method": method,
        "trainable_params": runs[0]["trainable_params"],
        "trainable_pct": 100 * runs[0]["trainable_params"] / runs[0]["total_params"],
        **{
            k: statistics.median(r[k] for r in runs)
            for k in ("tokens_per_s", "target_tokens_per_s", "step_s_median", "run_s")
        },
        "peak_rss_mib": max(r["peak_rss_bytes"] for r in runs) / 2**20,
        "xla_step_peak_mib": runs[0]["xla_step_peak_bytes"] / 2**20,
        "runs": runs,
        "probes": probes,
    }


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=6, help="updates per run (the first compiles)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for both methods, e.g. --set data.batch_size=8",
    )
    parser.add_argument("--out", default="benchmarks/results/train_pipeline.json")
    parser.add_argument("--child", choices=sorted(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first update compiles and is not timed")
    if args.child:
        result = child(args.child, args.steps, args.output_dir, args.set)
        (args.output_dir / "result.json").write_text(json.dumps(result))
        return None

    runs = {m: [] for m in METHODS}
    probes = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory(prefix="train_pipeline_") as tmp:
        for r in range(args.rounds):
            for method in list(METHODS)[:: 1 if r % 2 == 0 else -1]:
                before = common.matmul_rate()
                runs[method].append(spawn(method, args.steps, Path(tmp) / f"{method}{r}", args.set))
                probes[method].append((before, common.matmul_rate()))
    rows = [summarise(m, runs[m], probes[m]) for m in METHODS]
    full = rows[-1]
    for row in rows:
        row["tokens_per_s_vs_full"] = row["tokens_per_s"] / full["tokens_per_s"]
        row["peak_rss_vs_full"] = row["peak_rss_mib"] / full["peak_rss_mib"]
        row["xla_peak_vs_full"] = row["xla_step_peak_mib"] / full["xla_step_peak_mib"]
    all_probes = [p for m in METHODS for pair in probes[m] for p in pair]
    result = {
        "benchmark": "train_pipeline",
        "configs": METHODS,
        "overrides": overrides(args.steps, Path("<tmp>"), args.set),
        "rounds": args.rounds,
        "command": common.command("benchmarks.train_pipeline", argv),
        "machine": machine(),
        "probe_gflops": {"min": min(all_probes), "max": max(all_probes)},
        "methods": rows,
    }
    print(
        f"{rows[0]['runs'][0]['model']} through train.run.train, {args.steps} updates per run "
        f"(first not timed), {args.rounds} rounds, {result['machine']['cpu']} "
        f"x{result['machine']['cores']}"
    )
    print(
        common.table(
            rows,
            [
                ("method", "method", ""),
                ("trainable_params", "trainable", ",d"),
                ("trainable_pct", "%", ".2f"),
                ("tokens_per_s", "tokens/s", ",.0f"),
                ("target_tokens_per_s", "target tok/s", ",.0f"),
                ("step_s_median", "step s", ".2f"),
                ("tokens_per_s_vs_full", "tok/s vs full", ".2f"),
                ("peak_rss_mib", "peak RSS MiB", ",.0f"),
                ("peak_rss_vs_full", "RSS vs full", ".2f"),
                ("xla_step_peak_mib", "XLA step MiB", ",.0f"),
                ("xla_peak_vs_full", "XLA vs full", ".2f"),
                ("run_s", "run s", ".0f"),
            ],
        )
    )
    print(
        f"matmul probe {result['probe_gflops']['min']:.1f}-{result['probe_gflops']['max']:.1f} "
        f"GFLOP/s"
    )
    print(f"wrote {common.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
