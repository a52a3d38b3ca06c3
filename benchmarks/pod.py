"""docs/pod.md: `lora-jax plan` for Llama-3.1-8B and -70B on TPU slices, LoRA beside full
fine-tuning, and the sharding policies compared on one slice.

    python -m benchmarks.pod [--out docs/pod.md] [--json benchmarks/results/pod.json] [--render]

Every figure is the TPU compiler's (libtpu, the ``[tpu-plan]`` extra) for the train step
``lora-jax train`` runs, compiled from shapes alone (train/plan.py). Global batches are
>= 1M tokens of 8,192; rows per micro-batch x micro-batches = the rows of one update.
About 30-60 minutes on 2 CPU cores (each 8B/70B step takes minutes to compile).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from train import plan as plan_lib
from train.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pod"


@dataclasses.dataclass(frozen=True)
class Case:
    title: str
    config: str  # file in configs/pod/
    topology: str
    overrides: tuple[str, ...]  # mesh and batch for this slice


def _layout(fsdp: int, tensor: int, rows: int, micro: int) -> tuple[str, ...]:
    return (
        "mesh.data=1",
        f"mesh.fsdp={fsdp}",
        f"mesh.tensor={tensor}",
        f"data.batch_size={rows // micro}",
        f"optim.grad_accum_steps={micro}",
    )


CASES = (
    Case("Llama-3.1-8B on v5e-256", "llama-3.1-8b_lora.yaml", "v5e:16x16", _layout(64, 4, 256, 4)),
    Case("Llama-3.1-8B on v6e-64", "llama-3.1-8b_lora.yaml", "v6e:8x8", _layout(16, 4, 128, 4)),
    Case(
        "Llama-3.1-70B on v5p-128", "llama-3.1-70b_lora.yaml", "v5p:4x4x8", _layout(32, 4, 128, 4)
    ),
    Case(
        "Llama-3.1-70B on v6e-256", "llama-3.1-70b_lora.yaml", "v6e:16x16", _layout(64, 4, 256, 4)
    ),
)
# the 8B LoRA step on v5e-256 under other policies: (what changes, overrides)
POLICIES = (
    ("fsdp over all 256 chips, 1 row each, no micro-batches", _layout(256, 1, 256, 1)),
    ("factors replicated", ("mesh.factors=replicated",)),
    ("remat dots (keep matmul outputs)", ("model.remat=dots",)),
)


def plan_case(case: Case, extra: tuple[str, ...] = (), full: bool = True) -> list[dict[str, Any]]:
    cfg = load_config(CONFIGS / case.config, [*case.overrides, *extra])
    target = plan_lib.tpu_target(case.topology)
    plans = [plan_lib.plan(cfg, target)]
    if full:
        plans.append(plan_lib.plan(plan_lib.full_fine_tuning(cfg), target))
    return plans


def findings(results: dict[str, Any]) -> str:
    """What the plans say, read off ``results``: memory of LoRA against full fine-tuning per
    slice, and what each policy of the 8B comparison costs against the configuration."""
    lines = []
    for title, (lora, full) in results["cases"].items():
        cap = lora["per_device"]["capacity"] / plan_lib.GiB
        lora_gib, full_gib = (p["per_device"]["total"] / plan_lib.GiB for p in (lora, full))
        verdict = (
            "both fit"
            if lora["fits"] and full["fits"]
            else "only LoRA fits"
            if lora["fits"]
            else "neither fits"
        )
        speed = ""
        if lora["tokens_per_s_per_device"] and full["tokens_per_s_per_device"]:
            ratio = (
                lora["tokens_per_s_per_device"]["mfu_40"]
                / full["tokens_per_s_per_device"]["mfu_40"]
            )
            speed = f"; at equal MFU LoRA processes {ratio:.2f}x the tokens (fewer FLOPs)"
        lines.append(
            f"- **{title}**: LoRA {lora_gib:.2f} GiB per chip, full fine-tuning "
            f"{full_gib:.2f} GiB, of {cap:.0f}: {verdict}{speed}."
        )
    base, *variants = results["policies"]
    base_gib = base["per_device"]["total"] / plan_lib.GiB
    lines.append(f"- **Policies** (8B LoRA on v5e-256, {base_gib:.2f} GiB per chip as configured):")
    for p in variants:
        gathers = (p["collectives"] or {}).get("all-gather")
        gathered = (
            f", all-gathers {gathers['count']:,} ({gathers['bytes'] / plan_lib.GiB:.1f} GiB)"
            if gathers
            else ""
        )
        gib = p["per_device"]["total"] / plan_lib.GiB
        args = (p["per_device"]["arguments"] - base["per_device"]["arguments"]) / plan_lib.GiB
        lines.append(
            f"  - {p['variation']}: {gib:.2f} GiB ({'fits' if p['fits'] else 'does not fit'}"
            f"; arguments {args:+.2f} GiB{gathered}). {WHY.get(p['variation'], '')}"
        )
    return "\n".join(lines)


# why each policy of POLICIES costs what it does (the mechanism; the figures are computed)
WHY = {
    POLICIES[0][0]: "One whole 8,192-token row per chip and the 128,256-entry vocabulary "
    "whole on it: the row's float32 logits (4.2 GB) and their gradient are most of the "
    "difference. The configured layout splits the vocabulary over tensor=4 and the update "
    "into 4 micro-batches.",
    POLICIES[1][0]: "The factors and their AdamW moments whole on every chip cost a few "
    "hundred MiB of arguments and the same FLOPs; fewer but not smaller gathers (the "
    "weights they adapt are gathered anyway), so `inherit` stays the default.",
    POLICIES[2][0]: "Keeping every matmul output of 32 layers at 8,192 tokens takes "
    "several times the memory of full remat (only each layer's input kept), which the "
    "configs use.",
}


def render(results: dict[str, Any]) -> str:
    """docs/pod.md from the results of :func:`main` (``benchmarks/results/pod.json``)."""
    sections = []
    for case in CASES:
        plans = results["cases"][case.title]
        sections.append(
            f"### {case.title}\n\n`lora-jax plan configs/pod/{case.config} --topology "
            f"{case.topology} {' '.join(case.overrides)}`\n\n{plan_lib.table(plans)}\n\n"
            + "\n".join(f"- {plan_lib.collective_lines(p)}" for p in plans)
        )
    chips = sorted({c.topology.split(":")[0] for c in CASES})
    chip_lines = "\n".join(
        f"- {c.name}: {c.hbm_bytes / plan_lib.GiB:.0f} GiB HBM, {c.peak_flops / 1e12:.0f} "
        f"TFLOP/s bf16, {c.hbm_bytes_per_s / 1e9:.0f} GB/s ({c.source})"
        for c in plan_lib.CHIPS.values()
        if c.name in chips
    )
    return f"""# Pod-scale plans

Generated by `python -m benchmarks.pod` ({results["minutes"]:.0f} min on a 2-core CPU),
which runs `lora-jax plan` (train/plan.py) for each slice: the TPU compiler (libtpu
0.0.42, no TPU needed) compiles the very train step `lora-jax train` runs, from shapes
alone, and reports per chip. LoRA is r=16 on every projection (q, k, v, o, gate, up,
down; configs/pod/), bf16 base and activations, float32 factors and AdamW state, scanned
layers with full remat, TPU's splash attention (Pallas; `model.attention=auto` picks it on
TPU); 8,192 tokens per row, >= 1M tokens per update.

## What the plans say

{findings(results)}

## How to read the tables

- **arguments / temp / total**: the compiler's own memory figures per chip (total =
  arguments + outputs - donated + temporaries) against the chip's HBM; a step the
  compiler refuses shows its figure for the temporaries and no FLOPs.
- **compiled TFLOP**: the dot and convolution FLOPs of the compiled step, each loop body
  weighed by its trip count (XLA's cost analysis counts a scanned layer once); it includes
  remat's recomputation but not the splash attention kernel's FLOPs (a Pallas kernel is
  opaque to the compiler's analysis), so it can fall below the model's.
- **model TFLOP**: the formula (train/plan.py `model_flops`): full fine-tuning 6·P + 3·a
  per token, LoRA 4·P + 3·a + 6·F (no weight gradients of the frozen P; F factor elements).
- **step ≥ s**: max(compiled FLOPs / peak, bytes accessed / HBM bandwidth), a lower bound.
- **tokens/s/chip @40%**: tokens per chip over (model FLOPs / (0.4 x peak)).
- **collectives**: per chip and step, loop bodies counted as often as they run.

Chips:
{chip_lines}

## The plans

{chr(10).join(sections)}

## Policies for the 8B LoRA step on v5e-256

{plan_lib.table(results["policies"])}

Rows in order: the configuration above, then
{chr(10).join(f"{i + 2}. {what}" for i, (what, _) in enumerate(POLICIES))}.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/pod.md")
    parser.add_argument("--json", default="benchmarks/results/pod.json")
    parser.add_argument(
        "--render", action="store_true", help="only write --out again from the --json results"
    )
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(Path(args.json).read_text())
    else:
        started = time.time()
        results = {"cases": {}, "policies": []}
        for case in CASES:
            print(f"{case.title} ...", flush=True)
            results["cases"][case.title] = plan_case(case)
        baseline = CASES[0]
        results["policies"] = [results["cases"][baseline.title][0]]
        for what, extra in POLICIES:
            print(f"policy: {what} ...", flush=True)
            p = plan_case(baseline, extra, full=False)[0]
            results["policies"].append(p | {"variation": what})
        results["minutes"] = (time.time() - started) / 60
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    text = render(results)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
