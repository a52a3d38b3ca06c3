"""Train step of full fine-tuning vs LoRA (factored `lj.apply`) vs LoRA (`lj.materialize`).

    python -m benchmarks.train_step                 # SmolLM2-135M shape, 8×128, float32
    python -m benchmarks.train_step --quick        # tiny model, 1 round: a smoke check
    python -m benchmarks.train_step --base-dtype bfloat16       # frozen base weights in bf16
    python -m benchmarks.train_step --model gpt2-large --dtype bfloat16 --seq 512   # a GPU

Each method's step (forward, backward, AdamW update) is jitted once; then the
methods are timed in alternating rounds, so their ratios are measured side by
side in one regime of the machine. Peak memory is XLA's own accounting of the
compiled step (arguments + outputs + temporaries − donated aliases), which is
what the step needs on the device; optimizer-state bytes are counted from the
state's arrays. A numpy matmul probe before and after each round records the
CPU regime. Weights are random: speed and memory do not depend on their values.

`--dtype` is the compute dtype; `--base-dtype` (default: `--dtype`) stores the base weights,
e.g. `--base-dtype bfloat16` with float32 compute: frozen base weights in bfloat16, LoRA
factors (and their optimizer state) in float32 (`lj.init` promotes them). Full fine-tuning
then trains the bfloat16 weights themselves, with bfloat16 AdamW moments.

On a GPU (e.g. `--model gpt2-large --dtype bfloat16`, `make bench-gpu`) the table adds
model-FLOPs utilisation: model FLOPs per step / step time / the device's peak FLOP/s
(`PEAK_FLOPS`, dense, by device kind and compute dtype; not reported on CPU). Model FLOPs
per step, with N = batch × seq tokens and P = the base parameters that enter matmuls (all
but the embedding lookups: the token table counts once, as the LM head, when tied; the
position table never; norms and biases are included, a negligible excess):

    full fine-tuning   6·N·P           + 12·layers·heads·head_dim·seq·N
    LoRA               4·N·P + 6·N·P_r + 12·layers·heads·head_dim·seq·N

6·N·P is the forward (2·N·P), the activation gradients (2·N·P) and the weight gradients
(2·N·P); LoRA's frozen weights skip the weight-gradient matmuls, leaving ~4·N·P, plus
6·N·P_r for the P_r trainable factors. The attention term is the score and value matmuls
(4·heads·head_dim·seq per token and layer forward, ×3 with the backward, which they need
either way: they have no weights), counted without the causal mask's savings (PaLM's
convention). lora_materialize does the same model FLOPs as lora_apply (forming W + s·A·B is
overhead, not model work).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
import models
from benchmarks import common
from train.machine import machine
from train.step import token_losses

METHODS = ("full", "lora_apply", "lora_materialize")
QUICK = {"model": "tiny-llama", "batch": 2, "seq": 32, "rounds": 1, "steps": 1}

# (substring of jax's device_kind, compute dtype, dense peak FLOP/s); the first match counts.
PEAK_FLOPS = (
    ("H100 PCIe", "bfloat16", 756e12),
    ("H100", "bfloat16", 989e12),  # SXM
    ("H200", "bfloat16", 989e12),
    ("A100", "bfloat16", 312e12),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak FLOP/s for `dtype` compute, or None (CPU, unknown device)."""
    return next((f for kind, d, f in PEAK_FLOPS if kind in device_kind and d == dtype), None)


def model_flops(method: str, config, base, batch: int, seq: int, lora_params: int) -> float:
    """Model FLOPs of one training step (the formula of the module docstring)."""
    P = sum(x.size for x in jax.tree.leaves(base))
    if not config.tie_word_embeddings:
        P -= base["embed_tokens"]["embedding"].size
    if "embed_positions" in base:
        P -= base["embed_positions"]["embedding"].size
    N = batch * seq
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq * N
    if method == "full":
        return 6 * N * P + attention
    return 4 * N * P + 6 * N * lora_params + attention


COLUMNS = [
    ("method", "method", ""),
    ("trainable_params", "trainable", ",d"),
    ("trainable_pct", "% of total", ".3f"),
    ("step_s", "step s (median)", ".3f"),
    ("step_vs_full", "vs full", ".3f"),
    ("peak_bytes", "peak bytes", ",d"),
    ("peak_vs_full", "peak vs full", ".3f"),
    ("opt_state_bytes", "opt state bytes", ",d"),
    ("opt_state_vs_full", "full/this opt", ",.0f"),
]
MFU_COLUMN = ("mfu", "MFU", ".1%")


def _loss(logits_BxLxV, ids_BxL):
    """Mean next-token cross-entropy, nats (the training pipeline's loss, train/step.py)."""
    return jnp.mean(token_losses(logits_BxLxV, ids_BxL, 0.0))


def build(method: str, model, base, ids_BxL, rank: int, targets: str):
    """(jitted step, its args) for one method. The step returns (loss, new args)."""
    tx_inner = optax.adamw(1e-4)
    if method == "full":

        def step(params, opt_state, ids):
            loss, grads = jax.value_and_grad(lambda p: _loss(model.apply({"params": p}, ids), ids))(
                params
            )
            updates, opt_state = tx_inner.update(grads, opt_state, params)
            return loss, optax.apply_updates(params, updates), opt_state

        params = jax.tree.map(jnp.copy, base)  # donated below; keep `base` alive for the others
        return (
            jax.jit(step, donate_argnums=(0, 1)),
            (params, tx_inner.init(params), ids_BxL),
            params,
        )

    adapted = lj.init(jax.random.key(1), base, lj.LoraConfig(rank, 2 * rank, targets))
    frozen, trainable = lj.split(adapted)
    tx = lj.optimizer(tx_inner, trainable)
    forward = {
        "lora_apply": lambda p, ids: lj.apply(model.apply)({"params": p}, ids),
        "lora_materialize": lambda p, ids: model.apply({"params": lj.materialize(p)}, ids),
    }[method]

    def step(trainable, opt_state, frozen, ids):
        loss, grads = jax.value_and_grad(lambda t: _loss(forward(lj.combine(frozen, t), ids), ids))(
            trainable
        )
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return loss, optax.apply_updates(trainable, updates), opt_state

    return (
        jax.jit(step, donate_argnums=(0, 1)),
        (trainable, tx.init(trainable), frozen, ids_BxL),
        trainable,
    )


def peak_bytes(jitted, args) -> int:
    return common.peak_bytes(jitted.lower(*args).compile().memory_analysis())


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a models/ preset")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default=r".*/self_attn/(q_proj|v_proj)/kernel")
    parser.add_argument("--dtype", default="float32", help="compute dtype, e.g. bfloat16 on a GPU")
    parser.add_argument(
        "--base-dtype",
        help="storage dtype of the base weights (default: --dtype); LoRA factors stay float32",
    )
    parser.add_argument(
        "--remat",
        default="dots",
        choices=models.REMAT_POLICIES,
        help="what each layer keeps for the backward pass (train's default)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method per round")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = common.parse_args(parser, argv, QUICK)

    base_dtype = args.base_dtype or args.dtype
    config = models.get_config(
        args.model,
        scan_layers=True,
        remat_policy=args.remat,
        dtype=args.dtype,
        param_dtype=base_dtype,
    )
    model = models.Decoder(config)
    base = models.init_params(config, jax.random.key(0))
    ids_BxL = jax.random.randint(jax.random.key(2), (args.batch, args.seq), 0, config.vocab_size)

    runs, rows = {}, {}
    for method in METHODS:
        jitted, step_args, trainable = build(method, model, base, ids_BxL, args.rank, args.targets)
        compile_start = time.perf_counter()
        peak = peak_bytes(jitted, step_args)
        loss, *new = jitted(*step_args)  # compile + first step
        jax.block_until_ready(loss)
        runs[method] = [jitted, (*new, *step_args[2:])]
        rows[method] = {
            "method": method,
            "compile_s": time.perf_counter() - compile_start,
            "trainable_params": sum(x.size for x in jax.tree.leaves(trainable)),
            "opt_state_bytes": nbytes(new[1]),
            "peak_bytes": peak,
            "times": [],
            "probes": [],
        }

    common.timed_rounds(runs, rows, args.rounds, args.steps)

    total = sum(x.size for x in jax.tree.leaves(base))
    full = rows["full"]
    device_kind = jax.devices()[0].device_kind
    peak = peak_flops(device_kind, args.dtype) if jax.default_backend() != "cpu" else None
    for row in rows.values():
        row["step_s"] = statistics.median(row["times"])
        row["model_flops"] = model_flops(
            row["method"],
            config,
            base,
            args.batch,
            args.seq,
            0 if row["method"] == "full" else row["trainable_params"],
        )
        row["mfu"] = row["model_flops"] / row["step_s"] / peak if peak else None
        row["step_vs_full"] = row["step_s"] / statistics.median(full["times"])
        row["peak_vs_full"] = row["peak_bytes"] / full["peak_bytes"]
        row["opt_state_vs_full"] = full["opt_state_bytes"] / row["opt_state_bytes"]
        row["trainable_pct"] = 100 * row["trainable_params"] / total
    probes = [p for row in rows.values() for pair in row["probes"] for p in pair]
    result = {
        "benchmark": "train_step",
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "targets": args.targets,
        "dtype": args.dtype,
        "base_dtype": base_dtype,
        "remat": args.remat,
        "total_params": total,
        "command": common.command("benchmarks.train_step", argv),
        "machine": machine() | {"device_kind": device_kind},
        "peak_flops": peak,
        "flops_formula": "full 6*N*P, LoRA 4*N*P + 6*N*P_r; + 12*layers*heads*head_dim*seq*N "
        "attention; N = batch*seq, P = base params in matmuls",
        "probe_gflops": {"min": min(probes), "max": max(probes)},
        "apply_vs_materialize_time": rows["lora_apply"]["step_s"]
        / rows["lora_materialize"]["step_s"],
        "apply_vs_materialize_peak": rows["lora_apply"]["peak_bytes"]
        / rows["lora_materialize"]["peak_bytes"],
        "methods": list(rows.values()),
    }
    print(
        f"{args.model} ({total:,} params), batch {args.batch}x{args.seq}, compute {args.dtype}, "
        f"base weights {base_dtype}, {result['machine']['cpu']} x{result['machine']['cores']}, "
        f"{device_kind}"
    )
    print(common.table(list(rows.values()), COLUMNS + ([MFU_COLUMN] if peak else [])))
    print(
        f"apply / materialize: time {result['apply_vs_materialize_time']:.3f}, "
        f"peak memory {result['apply_vs_materialize_peak']:.3f}; matmul probe "
        f"{result['probe_gflops']['min']:.1f}-{result['probe_gflops']['max']:.1f} GFLOP/s"
    )
    print(f"wrote {common.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
