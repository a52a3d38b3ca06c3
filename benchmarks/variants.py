"""LoRA variants side by side (issue 18): step time and XLA memory of one LoRA train step.

    python -m benchmarks.variants            # SmolLM2-135M, 4 x 64 tokens, r = 8 on q, v
    python -m benchmarks.variants --quick    # tiny model, a smoke check

One jitted step (forward, backward, AdamW on the trainable half) of

* LoRA on the float32 base, and on the base stored in bfloat16;
* DoRA (``use_dora``) on the float32 base;
* LoRA on the bfloat16 base with its adapted kernels stored int8 (per channel) or nf4
  (QLoRA's, double-quantised block scales), dequantised to bfloat16 inside each layer.

The model computes in float32 throughout (``dtype``; a bfloat16 kernel is promoted in its
matmul). Steps are timed in alternating rounds, the median per variant after one warm-up
call (the compilation), between two numpy matmul probes of the CPU regime. Memory is XLA's
own account of the compiled step (``memory_analysis``): peak = arguments + outputs +
temporaries − aliased, and the temporaries alone. The frozen base's bytes are those of its
live buffers, and B/param those of the adapted kernels (quantized or not) per element.
Targets (the issue): DoRA <= 1.5x LoRA's step time; the nf4 step <= 1.3x the bfloat16-base
LoRA step. That DoRA's step forms no fan_in x fan_out temporary is a test
(tests/test_dora.py, ``test_the_gradient_forms_no_fan_in_by_fan_out_temporary``).
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
import models
from benchmarks import common
from benchmarks.many_adapters import timed
from benchmarks.train_step import peak_bytes
from train.machine import machine
from train.step import token_losses

TARGETS = r".*/(q_proj|v_proj)/kernel"
# variant -> (stored dtype of the base, use_dora, quantized format of the adapted kernels)
VARIANTS = {
    "LoRA": (jnp.float32, False, None),
    "LoRA, bf16 base": (jnp.bfloat16, False, None),
    "DoRA": (jnp.float32, True, None),
    "LoRA, int8 base": (jnp.bfloat16, False, "int8"),
    "LoRA, nf4 base": (jnp.bfloat16, False, "nf4"),
}
QUICK = {"model": "tiny-llama", "batch": 2, "seq": 16, "rounds": 2}


def adapted_params(base, rank: int, dtype, use_dora: bool, fmt: str | None):
    """`base` stored in `dtype`, with a rank-`rank` adapter on TARGETS (B = 0.01 so that
    DoRA's norm sees a non-zero B A), its adapted kernels stored as `fmt` unless None."""
    config = lj.LoraConfig(rank, 2.0 * rank, TARGETS, use_dora=use_dora)

    def make(base):
        stored = jax.tree.map(lambda w: w.astype(dtype), base)
        params = lj.init(jax.random.key(1), stored, config)
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.full_like(x, 0.01) if "lora_b" in jax.tree_util.keystr(path) else x,
            params,
        )
        return params if fmt is None else lj.quantize(params, fmt, TARGETS)

    return jax.jit(make)(base)


def train_step(model, params, ids_BxL):
    """(jitted step, its args): the loss's gradient wrt the trainable half, AdamW applied."""
    frozen, trainable = lj.split(params)
    tx = lj.optimizer(optax.adamw(1e-4), trainable)
    forward = lj.apply(model.apply)

    def step(trainable, opt_state, frozen, ids_BxL):
        def loss(t):
            logits = forward({"params": lj.combine(frozen, t)}, ids_BxL)
            return jnp.mean(token_losses(logits, ids_BxL, 0.0))

        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return value, optax.apply_updates(trainable, updates), opt_state

    return jax.jit(step), (trainable, tx.init(trainable), frozen, ids_BxL)


def kernel_bytes_per_param(params) -> float:
    """Bytes of the adapted kernels' live buffers per element of those kernels."""
    flat = lj.flatten_paths(params)
    kernels = [flat[p.removesuffix("_lora_a")] for p in flat if p.endswith("_lora_a")]
    return sum(k.nbytes for k in kernels) / sum(math.prod(k.shape) for k in kernels)


def rows(model, base, ids_BxL, rank: int, rounds: int) -> list[dict]:
    steps, out = {}, {}
    for name, (dtype, use_dora, fmt) in VARIANTS.items():
        params = adapted_params(base, rank, dtype, use_dora, fmt)
        jitted, args = train_step(model, params, ids_BxL)
        stats = jitted.lower(*args).compile().memory_analysis()
        steps[name] = lambda jitted=jitted, args=args: jitted(*args)
        out[name] = {
            "variant": name,
            "peak_bytes": peak_bytes(jitted, args),
            "temp_bytes": int(stats.temp_size_in_bytes),
            "frozen_bytes": sum(x.nbytes for x in jax.tree.leaves(args[2])),
            "kernel_bytes_per_param": kernel_bytes_per_param(params),
            "loss": float(jitted(*args)[0]),
        }
    seconds = timed(steps, rounds)
    for name, row in out.items():
        row["step_s"] = seconds[name]
        row["vs_lora"] = seconds[name] / seconds["LoRA"]
        row["vs_bf16_lora"] = seconds[name] / seconds["LoRA, bf16 base"]
        row["peak_vs_lora"] = row["peak_bytes"] / out["LoRA"]["peak_bytes"]
    return list(out.values())


COLUMNS = [
    ("variant", "variant", "s"),
    ("step_s", "step s (median)", ".3f"),
    ("vs_lora", "x LoRA", ".3f"),
    ("vs_bf16_lora", "x bf16 LoRA", ".3f"),
    ("peak_bytes", "XLA peak bytes", ",d"),
    ("peak_vs_lora", "peak x LoRA", ".3f"),
    ("temp_bytes", "XLA temp bytes", ",d"),
    ("frozen_bytes", "frozen bytes", ",d"),
    ("kernel_bytes_per_param", "adapted kernels B/param", ".4f"),
    ("loss", "loss", ".4f"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="rows per step")
    parser.add_argument("--seq", type=int, default=64, help="tokens per row")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--out", default="benchmarks/results/variants.json")
    args = common.parse_args(parser, argv, QUICK)

    options = dict(scan_layers=True, remat_policy="dots")  # as configs/e2e_lora.yaml runs it
    if args.model == "tiny-llama":
        cfg = models.with_options(models.get_config("tiny-llama"), **options)
        model, base = models.Decoder(cfg), models.init_params(cfg, jax.random.key(0))
    else:
        model, base, _ = models.load(args.model, **options)
    ids_BxL = jax.random.randint(
        jax.random.key(2), (args.batch, args.seq), 0, model.config.vocab_size
    )

    probe_before = common.matmul_rate()
    table_rows = rows(model, base, ids_BxL, args.rank, args.rounds)
    probe_after = common.matmul_rate()

    by = {r["variant"]: r for r in table_rows}
    targets = {
        "dora_step_within_1.5x_lora": by["DoRA"]["vs_lora"] <= 1.5,
        "nf4_step_within_1.3x_bf16_lora": by["LoRA, nf4 base"]["vs_bf16_lora"] <= 1.3,
        "nf4_kernels_within_0.53_bytes_per_param": by["LoRA, nf4 base"]["kernel_bytes_per_param"]
        <= 0.53,
    }
    print(f"train step: {args.batch} x {args.seq} tokens, rank {args.rank} on q, v; {args.model}")
    print(common.table(table_rows, COLUMNS))
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    print(f"matmul probe {probe_before:.1f} -> {probe_after:.1f} GFLOP/s")
    payload = {
        "benchmark": "variants",
        "model": args.model,
        "rank": args.rank,
        "batch": args.batch,
        "seq": args.seq,
        "command": common.command("benchmarks.variants", argv),
        "machine": machine(),
        "matmul_gflops_before": probe_before,
        "matmul_gflops_after": probe_after,
        "same_regime": common.same_regime([probe_before, probe_after]),
        "rows": table_rows,
        "targets": targets,
    }
    print(f"wrote {common.write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
