"""Inference latency at batch 1: base vs LoRA merged and unmerged vs the paper's baselines.

    python -m benchmarks.latency              # SmolLM2-135M shape, float32, 5 rounds
    python -m benchmarks.latency --quick      # tiny model, 1 round: a smoke check

The LoRA paper's Table 1 setting: batch 1, a short sequence, where the GPU (there) or the
CPU (here) has little parallel work to hide extra sequential layers in. Two measurements:
`forward`, one pass over a `--seq`-token sequence (128, the paper's batch-1 column), and
`generate`, a `--prompt`-token prompt then `--new-tokens` greedy tokens with the KV cache
(`models.generate`, EOS ignored). Variants (random weights: latency does not depend on them):

    base      the model
    merged    `lj.merge` of a LoRA (rank `--rank`, alpha 2·rank, on q_proj and v_proj, B
              non-zero): base-shaped weights, so the very same compiled program as base. The
              paper's claim is "no added latency": merged / base must be 1 within noise.
    unmerged  the adapted tree through `lj.apply` (factored: y = x·W + s·(x·A)·B, two thin
              matmuls more per target), as training and `models.generate` run it.
    adapter   Houlsby et al. 2019 bottleneck adapters after the attention and the MLP of
              every layer (`method: adapter_h`, train/adapters.py: around the unmodified
              model with `flax.linen.intercept_methods`), up-projections non-zero. The
              bottleneck size (`--bottleneck`) defaults to the one whose parameter count is
              closest to the LoRA's (SmolLM2-135M, r=8 on q,v: LoRA 460,800, bottleneck 6:
              449,640). The paper's Table 1 (GPT-2 medium, 0.5M and 11M adapter parameters)
              reports +20.7% (AdapterL) and +30.3% (AdapterH, this design) at batch 1.
    adapter_l Lin et al. 2020's (`method: adapter_l`): after the MLP, behind a LayerNorm;
              its bottleneck likewise matched to the LoRA's count.
    pre_embed prefix tuning (`method: pre_embed`, train/prefixes.py): `--prefix-length`
              trainable embeddings before the tokens (Li & Liang's l_p = 10 by default).
    pre_layer prefix tuning with every block's input at the prefix trainable
              (`method: pre_layer`): the same P more positions, so the same extra work.

Each variant's functions are compiled once; then the variants are timed in rounds whose
order rotates, each variant running `--forward-reps` forwards and `--generate-reps`
generations in a row, with a numpy matmul probe (`common.matmul_rate`) before and after.
A figure is the median of its round; ratios to base are taken within each round, and the
reported ratio is their median over the rounds whose probes agree within 25% (all rounds,
flagged, when none do), with their min-max as the spread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import lora_jax as lj
import models
from benchmarks import common
from train import adapters, prefixes
from train.machine import machine

VARIANTS = ("base", "merged", "unmerged", "adapter", "adapter_l", "pre_embed", "pre_layer")
TARGETS = r".*/self_attn/(q_proj|v_proj)/kernel"
PAPER = {
    "setting": "GPT-2 medium, batch 1, sequence 128, single forward, Quadro RTX8000",
    "adapter_l_vs_base": 1.207,
    "adapter_h_vs_base": 1.303,
}
QUICK = {
    "model": "tiny-llama",
    "rounds": 1,
    "forward_reps": 3,
    "generate_reps": 2,
    "seq": 32,
    "prompt": 16,
    "new_tokens": 16,
}


def randomize(tree, where, key, std: float = 0.02):
    """`tree` with the leaves whose '/'-joined path satisfies `where` drawn from N(0, std²)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = jax.random.split(key, len(leaves))
    new = [
        std * jax.random.normal(k, x.shape, x.dtype)
        if where("/".join(str(getattr(p, "key", p)) for p in path))
        else x
        for k, (path, x) in zip(keys, leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


DESIGN = "adapter_h"  # the `adapter` variant: Houlsby's, after attention and MLP


def adapter_params(config, bottleneck: int, design: str = DESIGN) -> int:
    """Parameters of ``design``'s bottleneck adapters (train/adapters.py's closed form)."""
    return adapters.parameter_count(design, config.hidden_size, config.num_layers, bottleneck)


def matched_bottleneck(config, lora_params: int, design: str = DESIGN) -> int:
    """The bottleneck size whose adapter parameter count is closest to `lora_params`."""
    return min(
        range(1, config.hidden_size + 1),
        key=lambda m: abs(adapter_params(config, m, design) - lora_params),
    )


def variants(args):
    """{name: (params, jitted forward, `apply_fn` for `models.generate`)}, the model, and facts
    about them."""
    config = models.get_config(args.model)
    model = models.Decoder(config)
    base = models.init_params(config, jax.random.key(0))
    adapted = lj.init(jax.random.key(1), base, lj.LoraConfig(args.rank, 2 * args.rank, TARGETS))
    adapted = randomize(adapted, lambda p: p.endswith("_lora_b"), jax.random.key(2))
    merged = lj.merge(adapted)
    if jax.tree.map(np.shape, merged) != jax.tree.map(np.shape, base):
        raise AssertionError("lj.merge changed the shapes of the base tree")
    lora_params = sum(x.size for x in jax.tree.leaves(lj.split(adapted)[1]))
    bottleneck = args.bottleneck or matched_bottleneck(config, lora_params)
    adapter_apply = adapters.apply(model.apply, DESIGN)
    with_adapter = adapters.init(jax.random.key(3), base, DESIGN, bottleneck)
    with_adapter = randomize(with_adapter, lambda p: "/adapter/up/" in p, jax.random.key(4))

    bottleneck_l = args.bottleneck or matched_bottleneck(config, lora_params, "adapter_l")
    lin_apply = adapters.apply(model.apply, "adapter_l")
    with_lin = adapters.init(jax.random.key(5), base, "adapter_l", bottleneck_l)
    with_lin = randomize(with_lin, lambda p: "/adapter/up/" in p, jax.random.key(6))
    prefixed = {}
    for j, design in enumerate(prefixes.DESIGNS):
        params = prefixes.init(jax.random.key(7 + j), base, design, args.prefix_length, model)
        prefix_apply = prefixes.apply(model.apply, design)
        prefixed[design] = (params, jax.jit(prefix_apply), prefix_apply)

    plain = jax.jit(model.apply)  # base and merged: one function, hence one executable
    found = {
        "base": (base, plain, model.apply),
        "merged": (merged, plain, model.apply),
        "unmerged": (adapted, jax.jit(lj.apply(model.apply)), model.apply),
        "adapter": (with_adapter, jax.jit(adapter_apply), adapter_apply),
        "adapter_l": (with_lin, jax.jit(lin_apply), lin_apply),
        **prefixed,
    }
    D, N, P = config.hidden_size, config.num_layers, args.prefix_length
    facts = {
        "total_params": sum(x.size for x in jax.tree.leaves(base)),
        "lora_params": lora_params,
        "bottleneck": bottleneck,
        "adapter_params": adapter_params(config, bottleneck),
        "extra_params": {
            "base": 0,
            "merged": 0,
            "unmerged": lora_params,
            "adapter": adapter_params(config, bottleneck),
            "adapter_l": adapter_params(config, bottleneck_l, "adapter_l"),
            **{d: prefixes.parameter_count(d, D, N, P) for d in prefixes.DESIGNS},
        },
        "bottleneck_l": bottleneck_l,
        "prefix_length": P,
    }
    return found, model, facts


def _timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _spread_pct(times: list[float]) -> float:
    """Interquartile range of a round's times, in % of their median."""
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return 100 * (q3 - q1) / statistics.median(times)


def summarise(rounds: list[dict], facts: dict) -> tuple[list[dict], list[int], bool]:
    """Table rows, the indices of the valid rounds, and whether any round was valid."""
    valid = [
        i
        for i, r in enumerate(rounds)
        if common.same_regime([p for v in r.values() for p in v["probes"]])
    ]
    any_valid = bool(valid)
    use = valid or list(range(len(rounds)))
    rows = []
    for name in VARIANTS:
        row = {"variant": name, "extra_params": facts["extra_params"][name]}
        for what in ("forward", "generate"):
            medians = [statistics.median(r[name][f"{what}_s"]) for r in rounds]
            ratios = [
                statistics.median(rounds[i][name][f"{what}_s"])
                / statistics.median(rounds[i]["base"][f"{what}_s"])
                for i in use
            ]
            row |= {
                f"{what}_ms": 1e3 * statistics.median(medians),
                f"{what}_spread_pct": statistics.median(
                    _spread_pct(r[name][f"{what}_s"]) for r in rounds
                ),
                f"{what}_vs_base": statistics.median(ratios),
                f"{what}_vs_base_range": f"{min(ratios):.3f}-{max(ratios):.3f}",
                f"{what}_vs_base_all": ratios,
            }
        rows.append(row)
    return rows, valid, any_valid


COLUMNS = [
    ("variant", "variant", ""),
    ("extra_params", "extra params", ",d"),
    ("forward_ms", "forward ms", ".2f"),
    ("forward_spread_pct", "IQR %", ".1f"),
    ("forward_vs_base", "vs base", ".3f"),
    ("forward_vs_base_range", "rounds", ""),
    ("generate_ms", "generate ms", ".1f"),
    ("generate_spread_pct", "IQR %", ".1f"),
    ("generate_vs_base", "vs base", ".3f"),
    ("generate_vs_base_range", "rounds", ""),
]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a models/ preset")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of rotating order")
    parser.add_argument(
        "--forward-reps", type=int, default=20, help="forwards per variant per round"
    )
    parser.add_argument(
        "--generate-reps", type=int, default=4, help="generations per variant per round"
    )
    parser.add_argument("--seq", type=int, default=128, help="tokens of the single forward")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens before generating")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2·rank)")
    parser.add_argument(
        "--bottleneck",
        type=int,
        default=0,
        help="adapter bottleneck size (default: parameter count closest to the LoRA's)",
    )
    parser.add_argument(
        "--prefix-length", type=int, default=10, help="PreEmbed / PreLayer positions"
    )
    parser.add_argument("--out", default="benchmarks/results/latency.json")
    args = common.parse_args(parser, argv, QUICK)

    found, model, facts = variants(args)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    seq_1xS = rng.integers(0, vocab, (1, args.seq), dtype=np.int32)
    prompt_1xP = rng.integers(0, vocab, (1, args.prompt), dtype=np.int32)

    calls, compile_s, outputs = {}, {}, {}
    for name, (params, forward, apply_fn) in found.items():

        def fwd(forward=forward, params=params):
            return forward({"params": params}, seq_1xS).block_until_ready()

        def gen(params=params, apply_fn=apply_fn):
            return models.generate(
                model,
                params,
                prompt_1xP,
                max_new_tokens=args.new_tokens,
                eos_token_id=-1,
                apply_fn=apply_fn,
            ).block_until_ready()

        start = time.perf_counter()
        outputs[name] = np.asarray(fwd())
        gen()
        compile_s[name] = time.perf_counter() - start
        calls[name] = (fwd, gen)
    # The merged model computes what the unmerged one does (float32 rounding apart).
    merge_error = float(np.abs(outputs["merged"] - outputs["unmerged"]).max())

    rounds = []
    for r in range(args.rounds):
        this = {}
        shift = r % len(VARIANTS)
        for name in VARIANTS[shift:] + VARIANTS[:shift]:
            fwd, gen = calls[name]
            before = common.matmul_rate()
            forward_s = _timed(fwd, args.forward_reps)
            generate_s = _timed(gen, args.generate_reps)
            this[name] = {
                "forward_s": forward_s,
                "generate_s": generate_s,
                "probes": (before, common.matmul_rate()),
            }
        rounds.append(this)

    rows, valid, any_valid = summarise(rounds, facts)
    by = {row["variant"]: row for row in rows}
    merged_ok = all(abs(by["merged"][f"{w}_vs_base"] - 1) <= 0.02 for w in ("forward", "generate"))
    probes = [p for r in rounds for v in r.values() for p in v["probes"]]
    result = {
        "benchmark": "latency",
        "model": args.model,
        "dtype": "float32",
        "batch": 1,
        "seq": args.seq,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "rank": args.rank,
        "targets": TARGETS,
        **facts,
        "rounds": args.rounds,
        "forward_reps": args.forward_reps,
        "generate_reps": args.generate_reps,
        "command": common.command("benchmarks.latency", argv),
        "machine": machine(),
        "probe_gflops": {"min": min(probes), "max": max(probes)},
        "valid_rounds": valid,
        "ratios_from_all_rounds": not any_valid,
        "compile_s": compile_s,
        "merged_vs_unmerged_max_abs_logit_diff": merge_error,
        "target_merged_within_2pct": merged_ok,
        "paper": PAPER,
        "variants": rows,
        "raw": rounds,
    }
    print(
        f"{args.model} ({facts['total_params']:,} params), batch 1, float32; forward of "
        f"{args.seq} tokens, generate {args.prompt}+{args.new_tokens} tokens; LoRA r={args.rank} "
        f"q,v ({facts['lora_params']:,} params), adapter bottleneck {facts['bottleneck']} "
        f"({facts['adapter_params']:,} params); {result['machine']['cpu']} "
        f"x{result['machine']['cores']}"
    )
    print(common.table(rows, COLUMNS))
    print(
        f"merged/base within ±2%: {'met' if merged_ok else 'NOT met'}; valid rounds "
        f"{len(valid)}/{args.rounds}{'' if any_valid else ' (none: ratios from all rounds)'}; "
        f"matmul probe {min(probes):.1f}-{max(probes):.1f} GFLOP/s; merged vs unmerged logits "
        f"max |diff| {merge_error:.2e}"
    )
    print(f"wrote {common.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
