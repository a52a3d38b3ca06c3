"""Write docs/benchmarks.md from the benchmarks' JSON results.

    python -m benchmarks.report                  # benchmarks/results/*.json -> docs/benchmarks.md
    python -m benchmarks.report --results DIR --out FILE

For each benchmark: what it measures, the machine and library versions of its run, the
exact command, its table, the CPU regime (the matmul probes) and the issue's targets, met or
not. A benchmark without a result file is listed with the command that makes it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_COMMANDS = {
    "train_step": "python -m benchmarks.train_step",
    "train_step_bf16_base": "python -m benchmarks.train_step --base-dtype bfloat16 "
    "--out benchmarks/results/train_step_bf16_base.json",
    "train_step_gpu": "python -m benchmarks.train_step --model gpt2-large --dtype bfloat16 "
    "--seq 512 --out benchmarks/results/train_step_gpu.json",
    "train_pipeline": "python -m benchmarks.train_pipeline",
    "decode": "python -m benchmarks.decode",
    "latency": "python -m benchmarks.latency",
    "peers": "python -m benchmarks.peers",
}

TITLES = {
    "train_step": "Training step: full fine-tuning vs LoRA (`lj.apply`) vs LoRA (`lj.materialize`)",
    "train_step_bf16_base": "Training step with the frozen base weights in bfloat16 (LoRA "
    "factors float32)",
    "train_step_gpu": "Training step on the GPU (bfloat16, model-FLOPs utilisation)",
    "train_pipeline": "LoRA vs full fine-tuning through the training pipeline (`lora-jax train`)",
    "decode": "Decoding: ours (`models.generate`) vs transformers `generate`",
    "latency": "Inference latency at batch 1: base vs merged vs unmerged LoRA vs the paper's baselines",
    "peers": "Peers: lora-jax vs PEFT + transformers (torch) on one training workload",
}

COLUMNS = {
    "train_step": [
        ("method", "method", ""),
        ("trainable_params", "trainable", ",d"),
        ("trainable_pct", "% of total", ".3f"),
        ("step_s", "step s", ".3f"),
        ("step_vs_full", "vs full", ".3f"),
        ("peak_bytes", "peak MiB", "mib"),
        ("peak_vs_full", "peak vs full", ".3f"),
        ("opt_state_bytes", "opt state MiB", "mib"),
        ("opt_state_vs_full", "full/this opt state", ",.0f"),
        ("mfu", "MFU", ".1%"),
    ],
    "train_pipeline": [
        ("method", "method", ""),
        ("trainable_params", "trainable", ",d"),
        ("tokens_per_s", "tokens/s", ",.0f"),
        ("target_tokens_per_s", "target tok/s", ",.0f"),
        ("step_s_median", "step s", ".2f"),
        ("tokens_per_s_vs_full", "tok/s vs full", ".2f"),
        ("peak_rss_mib", "peak RSS MiB", ",.0f"),
        ("peak_rss_vs_full", "RSS vs full", ".2f"),
        ("xla_step_peak_mib", "XLA step MiB", ",.0f"),
        ("xla_peak_vs_full", "XLA vs full", ".2f"),
    ],
    "decode": [
        ("impl", "impl", ""),
        ("batch", "batch", "d"),
        ("prompt_len", "prompt", "d"),
        ("new_tokens", "new", "d"),
        ("prefill_ms", "prefill ms", ".1f"),
        ("generate_s", "generate s", ".2f"),
        ("decode_tok_s", "decode tok/s", ".1f"),
    ],
    "latency": [
        ("variant", "variant", ""),
        ("extra_params", "extra params", ",d"),
        ("forward_ms", "forward ms", ".2f"),
        ("forward_spread_pct", "IQR %", ".1f"),
        ("forward_vs_base", "forward vs base", ".3f"),
        ("forward_vs_base_range", "over rounds", ""),
        ("generate_ms", "generate ms", ".1f"),
        ("generate_spread_pct", "IQR %", ".1f"),
        ("generate_vs_base", "generate vs base", ".3f"),
        ("generate_vs_base_range", "over rounds", ""),
    ],
    "peers": [
        ("method", "method", ""),
        ("library", "library", ""),
        ("trainable_params", "trainable", ",d"),
        ("step_s", "step s", ".3f"),
        ("vs_torch_peft", "vs torch+PEFT LoRA", ".3f"),
        ("vs_own_full", "vs own full", ".3f"),
        ("gflops", "model GFLOP/s", ".1f"),
        ("of_probe", "of matmul probe", ".0%"),
        ("peak_rss_mib", "peak RSS MiB", ",.0f"),
        ("rounds", "same-regime rounds", ""),
    ],
}
COLUMNS["train_step_gpu"] = COLUMNS["train_step_bf16_base"] = COLUMNS["train_step"]
ROWS = {
    "train_step": "methods",
    "train_step_bf16_base": "methods",
    "train_step_gpu": "methods",
    "train_pipeline": "methods",
    "decode": "rows",
    "latency": "variants",
    "peers": "workers",
}


def _cell(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "mib":
        return f"{value / 2**20:,.0f}"
    return format(value, spec)


def md_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table; `columns` are (key, header, format spec); absent columns are dropped."""
    columns = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    lines = [
        "| " + " | ".join(h for _, h, _ in columns) + " |",
        "|" + "|".join("---" if not f else "---:" for _, _, f in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def _verdict(ok) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[ok]


def targets(name: str, result: dict) -> list[tuple[str, str, object]]:
    """(target, figure, met: True/False/None for info only) of the issue's targets."""
    if name.startswith("train_step"):
        by = {r["method"]: r for r in result["methods"]}
        lora, cpu = by["lora_apply"], "cpu" in " ".join(result["machine"]["devices"]).lower()
        out = []
        if cpu and name == "train_step":
            out.append(
                (
                    "LoRA / full step time <= 0.65 on CPU",
                    f"{lora['step_vs_full']:.3f}",
                    lora["step_vs_full"] <= 0.65,
                )
            )
        out.append(
            (
                "LoRA peak memory vs full (paper: up to 3x less VRAM, GPT-3 175B)",
                f"{lora['peak_vs_full']:.3f} ({1 / lora['peak_vs_full']:.2f}x less)",
                None,
            )
        )
        out.append(("optimizer state, full / LoRA", f"{lora['opt_state_vs_full']:,.0f}x", None))
        if lora.get("mfu") is not None:
            out.append(
                (
                    "model-FLOPs utilisation, LoRA / full",
                    f"{lora['mfu']:.1%} / {by['full']['mfu']:.1%}",
                    None,
                )
            )
        return out
    if name == "latency":
        by = {r["variant"]: r for r in result["variants"]}
        merged, adapter = by["merged"], by["adapter"]
        ok = all(abs(merged[f"{w}_vs_base"] - 1) <= 0.02 for w in ("forward", "generate"))
        return [
            (
                "merged / base latency within ±2% (no added latency)",
                f"forward {merged['forward_vs_base']:.3f}, generate {merged['generate_vs_base']:.3f}",
                ok,
            ),
            (
                "unmerged (factored) / base",
                (
                    f"forward {by['unmerged']['forward_vs_base']:.3f}, "
                    f"generate {by['unmerged']['generate_vs_base']:.3f}"
                ),
                None,
            ),
            (
                "AdapterH / base (paper, batch 1: +30.3%)",
                f"forward {adapter['forward_vs_base']:.3f}, generate {adapter['generate_vs_base']:.3f}",
                None,
            ),
            *(  # results written before these variants were measured lack them
                (
                    f"{label} / base{paper}",
                    f"forward {by[v]['forward_vs_base']:.3f}, "
                    f"generate {by[v]['generate_vs_base']:.3f}",
                    None,
                )
                for v, label, paper in (
                    ("adapter_l", "AdapterL", " (paper, batch 1: +20.7%)"),
                    ("pre_embed", "PreEmbed", ""),
                    ("pre_layer", "PreLayer", ""),
                )
                if v in by
            ),
        ]
    if name == "peers":
        by = {r["worker"]: r for r in result["workers"]}
        ratio = by["jax-lora"]["vs_torch_peft"]
        return [
            (
                "lora-jax LoRA step <= 0.6x torch + PEFT LoRA (same CPU regime)",
                "-" if ratio is None else f"{ratio:.3f}",
                None if ratio is None else ratio <= 0.6,
            ),
            (
                "lowest ratio reachable: lora-jax's model FLOPs at the matmul probe's rate / torch + "
                "PEFT's step",
                "-" if result.get("ratio_bound") is None else f"{result['ratio_bound']:.3f}",
                None,
            ),
            (
                "lora-jax LoRA peak RSS < torch + PEFT LoRA's",
                f"{by['jax-lora']['peak_rss_mib']:,.0f} vs {by['torch-peft']['peak_rss_mib']:,.0f} MiB",
                by["jax-lora"]["peak_rss_mib"] < by["torch-peft"]["peak_rss_mib"],
            ),
        ]
    return []


def _regime(name: str, result: dict) -> str:
    if "probe_gflops" in result:
        p = result["probe_gflops"]
        text = f"numpy 1024² float32 matmul probe {p['min']:.1f}-{p['max']:.1f} GFLOP/s"
    elif "matmul_gflops_before" in result:
        text = (
            f"numpy 1024² float32 matmul probe {result['matmul_gflops_before']:.1f} before, "
            f"{result['matmul_gflops_after']:.1f} after"
        )
    else:
        return "no probe recorded"
    if name == "latency":
        text += (
            f"; rounds with all probes within 25%: {len(result['valid_rounds'])}/"
            f"{result['rounds']}"
            + (" (none: ratios from all rounds)" if result["ratios_from_all_rounds"] else "")
        )
    return text


def _machine(result: dict) -> str:
    m = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    device = m.get("device_kind") or ", ".join(m["devices"])
    return f"{m['cpu']}, {m['cores']} cores, device {device}, Python {m['python']}; {versions}"


def section(name: str, result: dict | None) -> tuple[str, list]:
    """The Markdown of one benchmark, and its target rows."""
    lines = [f"## {TITLES[name]}", ""]
    if result is None:
        return "\n".join(lines + [f"Not run yet: `{DEFAULT_COMMANDS[name]}`", ""]), []
    rows = result[ROWS[name]]
    found = targets(name, result)
    if "--quick" in result.get("command", ""):
        lines += ["**A --quick smoke run: a tiny model, figures not meaningful.**", ""]
    lines += [
        f"- machine: {_machine(result)}",
        f"- command: `{result.get('command', DEFAULT_COMMANDS[name])}`",
        f"- regime: {_regime(name, result)}",
    ]
    lines += _details(name, result)
    lines += ["", md_table(rows, COLUMNS[name]), ""]
    if found:
        lines += ["| target | figure | |", "|---|---|---|"]
        lines += [
            f"| {t} | {f} | {_verdict(ok) if ok is not None else 'reference'} |"
            for t, f, ok in found
        ]
        lines.append("")
    return "\n".join(lines), found


def _details(name: str, result: dict) -> list[str]:
    if name.startswith("train_step"):
        text = [
            (
                f"- workload: {result['model']} ({result['total_params']:,} params), batch "
                f"{result['batch']}×{result['seq']}, compute {result['dtype']}, base weights "
                f"{result.get('base_dtype', result['dtype'])}, LoRA r={result['rank']} on "
                f"`{result['targets']}`, AdamW"
            )
        ]
        if result.get("peak_flops"):
            text.append(
                f"- MFU: model FLOPs ({result['flops_formula']}) / step time / "
                f"{result['peak_flops'] / 1e12:.0f} TFLOP/s peak"
            )
        return text
    if name == "latency":
        return [
            (
                f"- workload: {result['model']} ({result['total_params']:,} params), batch 1, "
                f"float32; forward of {result['seq']} tokens; generate {result['prompt']} prompt + "
                f"{result['new_tokens']} greedy tokens with the KV cache; LoRA r={result['rank']} on "
                f"q,v ({result['lora_params']:,} params); Houlsby adapter bottleneck "
                f"{result['bottleneck']} ({result['adapter_params']:,} params), after attention "
                f"and MLP; medians over {result['forward_reps']} forwards and "
                f"{result['generate_reps']} generations per round, {result['rounds']} rounds"
            ),
            (
                f"- merged vs unmerged logits: max |diff| "
                f"{result['merged_vs_unmerged_max_abs_logit_diff']:.1e}"
            ),
        ]
    if name == "peers":
        lorax = result["jax_lorax"]
        status = (
            "installable with the installed JAX; " + lorax["why_not_measured"]
            if lorax["installable"]
            else "cannot be installed with the installed JAX (" + lorax["why_not_measured"] + ")"
        )
        return [
            (
                f"- workload: {result['model']} shape, batch {result['batch']}×{result['seq']}, "
                f"float32, AdamW, LoRA r={result['rank']} alpha {result['alpha']} on q_proj, v_proj; "
                f"lora-jax remat policy {result.get('remat', 'none')}; "
                f"each measurement in its own process, {result['steps']} timed steps after "
                f"{result['warmup']} warm-up, worker order alternating over {result['rounds']} rounds"
            ),
            (
                f"- jax-lorax {lorax['version']} (requires {', '.join(lorax['requires'])}): {status}. "
                f"{lorax.get('note', '')}"
            ),
        ]
    if name == "train_pipeline":
        return [
            (
                f"- configs: {', '.join(result['configs'].values())}; overrides "
                f"`{' '.join(result['overrides'])}`; {result['rounds']} rounds"
            )
        ]
    if name == "decode":
        return [f"- model: {result['model']}"]
    return []


def write(results_dir: Path, out: Path) -> str:
    results = {}
    for name in TITLES:
        path = results_dir / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.exists() else None
    sections, summary = [], []
    for name, result in results.items():
        if result is None and name == "train_step_gpu":
            continue  # only where a GPU was lent
        text, found = section(name, result)
        sections.append(text)
        summary += [(name, t, f, ok) for t, f, ok in found if ok is not None]
    head = [
        "# Benchmarks",
        "",
        (
            f"Written by `python -m benchmarks.report` from `{results_dir}/*.json` (`make bench` "
            "runs every benchmark, then this). Ratios are taken side by side within one run; "
            "a numpy matmul probe before and after each timed section records the CPU regime "
            "(the 2-vCPU machines here sometimes deliver one core's worth for minutes)."
        ),
        "",
        "## Targets",
        "",
        "| benchmark | target | figure | |",
        "|---|---|---|---|",
    ]
    head += [f"| {n} | {t} | {f} | {_verdict(ok)} |" for n, t, f, ok in summary]
    text = "\n".join(head + [""] + sections).rstrip() + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args(argv)
    write(args.results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
