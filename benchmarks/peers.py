"""lora-jax vs Hugging Face PEFT + transformers (torch, CPU) on one training workload.

    python -m benchmarks.peers               # SmolLM2-135M shape, 8×128, float32, 4 rounds
    python -m benchmarks.peers --quick       # tiny model, 1 round: a smoke check

The workload of benchmarks/train_step.py: a Llama of the `--model` preset's shape (the same
sizes as an HF `LlamaConfig`), random weights, batch 8×128 random tokens, float32,
next-token cross-entropy, AdamW (lr 1e-4, weight decay 1e-4, as optax's default), and for
LoRA r=8, alpha 16 on q_proj and v_proj. lora-jax runs as the shipped train configs do:
scanned layers, remat policy `dots` (`--remat`); torch as transformers does by default
(no gradient checkpointing, SDPA attention). Four workers:

    jax-lora     lora-jax: `lj.apply` (factored), only A and B trained (train_step's lora_apply)
    jax-full     lora-jax's model, every weight trained (train_step's full)
    torch-peft   transformers `LlamaForCausalLM` + `peft.get_peft_model` LoRA, torch.optim.AdamW
    torch-full   transformers `LlamaForCausalLM`, every weight trained

Each measurement runs in its own process (`--worker NAME`), which prints one JSON line: the
median step time of `--steps` timed steps after `--warmup` untimed ones (compilation for
JAX), its peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`: imports, model, compilation,
optimizer and the step's activations), and a numpy matmul probe (`common.matmul_rate`)
just before and after the timed steps. Torch workers run with OMP_WAIT_POLICY=PASSIVE and
as many threads as cores; they import neither JAX nor this project's models. The order of
the workers alternates over rounds (forward, then reversed). A ratio between two workers is
taken within a round, and only from rounds where the four probes of the two agree within
25% (the 2-vCPU machines here sometimes deliver one core's worth for minutes; torch slows
~5× then, JAX ~1.8×); step times are medians over the rounds where the worker's own two
probes agree, and peak RSS the largest over all rounds.

Both libraries do the same model FLOPs (benchmarks/train_step.py's formula, ~4·N·P for LoRA:
no weight gradients for frozen weights), almost all of them in matmuls, so the table also
gives each step's model GFLOP/s and its share of the numpy matmul probe's rate. That share
bounds what any library can gain: `ratio_bound` is lora-jax's model FLOPs at the fastest
probe of its run over torch + PEFT's step, the lowest lora-jax / torch + PEFT ratio the
machine allows.

`jax-lorax` (Davis Yoshida's LoRA transform) is checked, not installed: its newest release's
requirements, read from its wheel (`pip download --no-deps`), are tested against the JAX
installed here, and the finding is recorded (`--no-lorax-check` skips the download).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from benchmarks import common
from train.machine import machine

WORKERS = ("jax-lora", "torch-peft", "jax-full", "torch-full")
LIBRARY = {
    "jax-lora": "lora-jax",
    "jax-full": "lora-jax",
    "torch-peft": "torch + PEFT",
    "torch-full": "torch",
}
REFERENCE = "torch-peft"
TARGET_RATIO = 0.6  # the target: lora-jax LoRA step <= 0.6 x torch + PEFT's
QUICK = {"model": "tiny-llama", "rounds": 1, "batch": 2, "seq": 16, "steps": 2, "warmup": 1}
# What `lorax_finding` found when this file was written (used when pip cannot be reached).
LORAX_RECORDED = {
    "package": "jax-lorax",
    "version": "0.3.1",
    "requires": ["jax (>=0.4.6,<0.5.0)", "jaxlib (>=0.4.6,<0.5.0)", "qax (>=0.3.1)"],
    "note": "Every release (0.1.0 to 0.3.1) pins jax < 0.5 (pip: ResolutionImpossible with "
    "jax==0.10.2); its backend qax 0.4.1 pins jax < 0.5 and optax < 0.2 as well.",
}


# --- workers (one per process) ------------------------------------------------------------


def shape_of(model_name: str) -> dict:
    """The preset's sizes, for workers that must not import JAX (torch)."""
    import models

    c = models.get_config(model_name)
    if c.family != "llama":
        raise SystemExit(f"peers compares Llama-shaped models; {model_name} is {c.family}")
    return {
        k: getattr(c, k)
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
            "tie_word_embeddings",
            "rope_theta",
            "norm_eps",
        )
    }


def _time_steps(step, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        step()
    before = common.matmul_rate()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    after = common.matmul_rate()
    return {
        "step_s": statistics.median(times),
        "times": times,
        "probes": [before, after],
        "loss": float(loss),
    }


def jax_worker(method: str, args) -> dict:
    import jax

    import models
    from benchmarks.train_step import build, model_flops

    config = models.get_config(args.model, scan_layers=True, remat_policy=args.remat)
    model = models.Decoder(config)
    base = models.init_params(config, jax.random.key(0))
    ids_BxL = jax.random.randint(jax.random.key(2), (args.batch, args.seq), 0, config.vocab_size)
    jitted, step_args, trainable = build(
        {"lora": "lora_apply", "full": "full"}[method],
        model,
        base,
        ids_BxL,
        args.rank,
        args.targets,
    )
    trainable_params = sum(x.size for x in jax.tree.leaves(trainable))
    flops = model_flops(
        method, config, base, args.batch, args.seq, 0 if method == "full" else trainable_params
    )
    del base
    state = {"args": step_args}

    def step():
        loss, *new = jitted(*state["args"])
        jax.block_until_ready(loss)
        state["args"] = (*new, *state["args"][2:])
        return loss

    return _time_steps(step, args.warmup, args.steps) | {
        "trainable_params": trainable_params,
        "model_flops": flops,
        "threads": None,
    }


def torch_worker(method: str, args) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    s = json.loads(args.shape)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=s["vocab_size"],
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"],
        head_dim=s["head_dim"],
        max_position_embeddings=s["max_position_embeddings"],
        tie_word_embeddings=s["tie_word_embeddings"],
        rope_theta=s["rope_theta"],
        rms_norm_eps=s["norm_eps"],
        attention_bias=False,
        mlp_bias=False,
    )
    model = transformers.LlamaForCausalLM(config).float()
    if method == "lora":
        import peft

        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=args.rank,
                lora_alpha=2 * args.rank,
                target_modules=["q_proj", "v_proj"],
                lora_dropout=0.0,
                bias="none",
            ),
        )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4)
    ids_BxL = torch.randint(
        0, s["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(2)
    )

    def step():
        loss = model(input_ids=ids_BxL, labels=ids_BxL).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return _time_steps(step, args.warmup, args.steps) | {
        "trainable_params": sum(p.numel() for p in trainable),
        "threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }


def worker(name: str, args) -> dict:
    method = "full" if name.endswith("full") else "lora"
    result = (jax_worker if name.startswith("jax") else torch_worker)(method, args)
    return {
        "worker": name,
        **result,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def spawn(name: str, args, shape: dict) -> dict:
    """`worker(name)` in a fresh interpreter; returns its JSON line."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.peers",
        "--worker",
        name,
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--rank",
        str(args.rank),
        "--targets",
        args.targets,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--remat",
        args.remat,
        "--shape",
        json.dumps(shape),
    ]
    env = dict(os.environ)
    if name.startswith("torch"):
        env |= {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(os.cpu_count())}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"worker {name} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- jax-lorax ----------------------------------------------------------------------------


def lorax_finding(download: bool = True) -> dict:
    """Can `jax-lorax` be installed beside the JAX installed here? Read from its newest wheel's
    metadata (nothing is installed); falls back to LORAX_RECORDED when pip cannot fetch it."""
    from importlib import metadata

    from packaging.requirements import Requirement

    installed = {p: metadata.version(p) for p in ("jax", "jaxlib", "optax")}
    finding = dict(LORAX_RECORDED, source="recorded when benchmarks/peers.py was written")
    if download:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                done = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "-q",
                        "--no-deps",
                        "--no-cache-dir",
                        "jax-lorax",
                        "-d",
                        tmp,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                done = subprocess.CompletedProcess([], 1, "", "pip download timed out")
            wheels = list(Path(tmp).glob("jax_lorax-*.whl"))
            if done.returncode == 0 and wheels:
                with zipfile.ZipFile(wheels[0]) as wheel:
                    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
                    lines = wheel.read(meta).decode().splitlines()
                finding = dict(
                    LORAX_RECORDED,
                    source=f"pip download --no-deps: {wheels[0].name}",
                    version=next(
                        x.split(":", 1)[1].strip() for x in lines if x.startswith("Version:")
                    ),
                    requires=[
                        x.split(":", 1)[1].strip() for x in lines if x.startswith("Requires-Dist:")
                    ],
                )
            else:
                finding["download_error"] = (done.stderr or "no wheel")[-500:]
    conflicts = []
    for text in finding["requires"]:
        req = Requirement(text.replace("(", "").replace(")", ""))
        if req.name in installed and not req.specifier.contains(
            installed[req.name], prereleases=True
        ):
            conflicts.append(
                f"{req.name}{req.specifier} vs installed {req.name} {installed[req.name]}"
            )
    finding |= {
        "installed": installed,
        "conflicts": conflicts,
        "installable": not conflicts,
        "measured": False,
        "why_not_measured": "; ".join(conflicts)
        if conflicts
        else "its requirements allow the installed JAX: install it to measure it",
    }
    return finding


# --- the parent ---------------------------------------------------------------------------


def summarise(rounds: list[dict]) -> list[dict]:
    """One row per worker. `model_flops` is the JAX worker's count of the same method (the
    workload is the same); `gflops` is model FLOPs per second of the median step, and
    `of_probe` that rate over the median of the worker's matmul probes: the share of the
    machine's plain matmul rate the step reaches (its model FLOPs are ~all matmuls)."""
    rows = []
    for name in WORKERS:
        runs = [r[name] for r in rounds]
        flops = rounds[0]["jax-full" if name.endswith("full") else "jax-lora"]["model_flops"]
        steady = [x["step_s"] for x in runs if common.same_regime(x["probes"])]
        pair = [
            r[name]["step_s"] / r[REFERENCE]["step_s"]
            for r in rounds
            if common.same_regime(r[name]["probes"] + r[REFERENCE]["probes"])
        ]
        full = name.split("-")[0] + "-full"
        vs_full = [
            r[name]["step_s"] / r[full]["step_s"]
            for r in rounds
            if common.same_regime(r[name]["probes"] + r[full]["probes"])
        ]
        step_s = statistics.median(steady) if steady else None
        probe = statistics.median(p for x in runs for p in x["probes"])
        rows.append(
            {
                "worker": name,
                "method": "full" if name.endswith("full") else "LoRA",
                "library": LIBRARY[name],
                "trainable_params": runs[0]["trainable_params"],
                "step_s": step_s,
                "model_flops": flops,
                "gflops": flops / step_s / 1e9 if step_s else None,
                "of_probe": flops / step_s / 1e9 / probe if step_s else None,
                "step_s_all_rounds": [x["step_s"] for x in runs],
                "steady_rounds": len(steady),
                "vs_torch_peft": statistics.median(pair) if pair else None,
                "vs_torch_peft_rounds": len(pair),
                "vs_own_full": statistics.median(vs_full) if vs_full else None,
                "peak_rss_mib": max(x["peak_rss_bytes"] for x in runs) / 2**20,
                "probes": [x["probes"] for x in runs],
            }
        )
    return rows


COLUMNS = [
    ("method", "method", ""),
    ("library", "library", ""),
    ("trainable_params", "trainable", ",d"),
    ("step_s", "step s", ".3f"),
    ("vs_torch_peft", "vs torch+PEFT LoRA", ".3f"),
    ("vs_own_full", "vs own full", ".3f"),
    ("gflops", "GFLOP/s", ".1f"),
    ("of_probe", "of matmul probe", ".0%"),
    ("peak_rss_mib", "peak RSS MiB", ",.0f"),
    ("rounds", "same-regime rounds", ""),
]


def ratio_bound(rounds: list[dict]) -> float | None:
    """The lowest jax-lora / torch-peft ratio physics allows: jax-lora's model FLOPs at the
    fastest matmul probe of its run, over torch-peft's step, median over same-regime rounds.
    A step cannot beat its FLOPs at the machine's matmul rate, so no target below it is
    reachable on that machine with that torch."""
    bounds = [
        r["jax-lora"]["model_flops"] / (max(r["jax-lora"]["probes"]) * 1e9) / r[REFERENCE]["step_s"]
        for r in rounds
        if common.same_regime(r["jax-lora"]["probes"] + r[REFERENCE]["probes"])
    ]
    return statistics.median(bounds) if bounds else None


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a Llama-family models/ preset")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--targets",
        default=r".*/self_attn/(q_proj|v_proj)/kernel",
        help="lora-jax's target regex (PEFT: q_proj, v_proj)",
    )
    parser.add_argument(
        "--remat",
        default="dots",
        choices=("none", "dots", "full"),
        help="lora-jax's remat policy (train's default: dots)",
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds, worker order alternating")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per worker")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation)")
    parser.add_argument(
        "--no-lorax-check",
        action="store_true",
        help="record the jax-lorax finding without pip download",
    )
    parser.add_argument("--out", default="benchmarks/results/peers.json")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = common.parse_args(parser, argv, QUICK)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return None

    shape = shape_of(args.model)
    rounds = []
    for r in range(args.rounds):
        order = WORKERS if r % 2 == 0 else WORKERS[::-1]
        rounds.append({name: spawn(name, args, shape) for name in order} | {"order": list(order)})
    rows = summarise(rounds)
    for row in rows:
        row["rounds"] = f"{row['vs_torch_peft_rounds']}/{args.rounds}"
    by = {row["worker"]: row for row in rows}
    ratio = by["jax-lora"]["vs_torch_peft"]
    bound = ratio_bound(rounds)
    targets = {
        "jax_lora_vs_torch_peft_le_0.6": None if ratio is None else ratio <= TARGET_RATIO,
        "jax_lora_less_peak_rss": by["jax-lora"]["peak_rss_mib"] < by[REFERENCE]["peak_rss_mib"],
    }
    lorax = lorax_finding(download=not args.no_lorax_check)
    probes = [p for row in rows for pair in row["probes"] for p in pair]
    result = {
        "benchmark": "peers",
        "model": args.model,
        "shape": shape,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "alpha": 2 * args.rank,
        "dtype": "float32",
        "remat": args.remat,
        "ratio_bound": bound,
        "targets_regex": args.targets,
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "command": common.command("benchmarks.peers", argv),
        "machine": machine(),
        "probe_gflops": {"min": min(probes), "max": max(probes)},
        "targets": targets,
        "jax_lorax": lorax,
        "workers": rows,
        "raw": rounds,
    }
    print(
        f"{args.model} shape, batch {args.batch}x{args.seq}, float32, AdamW, LoRA r={args.rank} "
        f"alpha {2 * args.rank} on q,v; {args.rounds} rounds; {result['machine']['cpu']} "
        f"x{result['machine']['cores']}"
    )
    print(common.table(rows, COLUMNS))
    verdict = {True: "met", False: "NOT met", None: "no same-regime round"}
    print(
        f"lora-jax LoRA / torch+PEFT LoRA <= {TARGET_RATIO}: "
        f"{verdict[targets['jax_lora_vs_torch_peft_le_0.6']]}; "
        f"less peak RSS: {verdict[targets['jax_lora_less_peak_rss']]}; "
        f"matmul probe {min(probes):.1f}-{max(probes):.1f} GFLOP/s"
    )
    if bound is not None:
        print(
            f"lowest ratio reachable here (lora-jax's model FLOPs at the matmul probe's rate, "
            f"over torch+PEFT's step): {bound:.3f}"
        )
    print(
        f"jax-lorax {lorax['version']}: "
        + (
            "installable with the installed JAX"
            if lorax["installable"]
            else "not installable: " + lorax["why_not_measured"]
        )
    )
    print(f"wrote {common.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
