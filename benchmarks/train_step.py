"""Train step of full fine-tuning vs LoRA (factored `lj.apply`) vs LoRA (`lj.materialize`).

    python -m benchmarks.train_step                 # SmolLM2-135M shape, 8×128, float32
    python -m benchmarks.train_step --model tiny-llama --rounds 1   # a quick check

Each method's step (forward, backward, AdamW update) is jitted once; then the
methods are timed in alternating rounds, so their ratios are measured side by
side in one regime of the machine. Peak memory is XLA's own accounting of the
compiled step (arguments + outputs + temporaries − donated aliases), which is
what the step needs on the device; optimizer-state bytes are counted from the
state's arrays. A numpy matmul probe before and after each round records the
CPU regime. Weights are random: speed and memory do not depend on their values.
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

METHODS = ("full", "lora_apply", "lora_materialize")


def _loss(logits_BxLxV, ids_BxL):
  logp = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, ids_BxL[:, 1:, None], axis=-1))


def build(method: str, model, base, ids_BxL, rank: int, targets: str):
  """(jitted step, its args) for one method. The step returns (loss, new args)."""
  tx_inner = optax.adamw(1e-4)
  if method == "full":
    def step(params, opt_state, ids):
      loss, grads = jax.value_and_grad(lambda p: _loss(model.apply({"params": p}, ids), ids))(params)
      updates, opt_state = tx_inner.update(grads, opt_state, params)
      return loss, optax.apply_updates(params, updates), opt_state
    params = jax.tree.map(jnp.copy, base)  # donated below; keep `base` alive for the others
    return jax.jit(step, donate_argnums=(0, 1)), (params, tx_inner.init(params), ids_BxL), params

  adapted = lj.init(jax.random.key(1), base, lj.LoraConfig(rank, 2 * rank, targets))
  frozen, trainable = lj.split(adapted)
  tx = lj.optimizer(tx_inner, trainable)
  forward = {
      "lora_apply": lambda p, ids: lj.apply(model.apply)({"params": p}, ids),
      "lora_materialize": lambda p, ids: model.apply({"params": lj.materialize(p)}, ids),
  }[method]

  def step(trainable, opt_state, frozen, ids):
    loss, grads = jax.value_and_grad(
        lambda t: _loss(forward(lj.combine(frozen, t), ids), ids))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return loss, optax.apply_updates(trainable, updates), opt_state

  return (jax.jit(step, donate_argnums=(0, 1)), (trainable, tx.init(trainable), frozen, ids_BxL),
          trainable)


def peak_bytes(jitted, args) -> int:
  stats = jitted.lower(*args).compile().memory_analysis()
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="smollm2-135m", help="a models/ preset")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--targets", default=r".*/self_attn/(q_proj|v_proj)/kernel")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
  parser.add_argument("--steps", type=int, default=2, help="timed steps per method per round")
  parser.add_argument("--out", default="benchmarks/results/train_step.json")
  args = parser.parse_args(argv)

  config = models.get_config(args.model, scan_layers=True, dtype=args.dtype, param_dtype=args.dtype)
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
        "method": method, "compile_s": time.perf_counter() - compile_start,
        "trainable_params": sum(x.size for x in jax.tree.leaves(trainable)),
        "opt_state_bytes": nbytes(new[1]), "peak_bytes": peak, "times": [], "probes": []}

  for r in range(args.rounds):
    order = METHODS[r % 3:] + METHODS[:r % 3]
    for method in order:
      jitted, step_args = runs[method]
      before = common.matmul_rate()
      for _ in range(args.steps):
        start = time.perf_counter()
        loss, *new = jitted(*step_args)
        jax.block_until_ready(loss)
        rows[method]["times"].append(time.perf_counter() - start)
        step_args = (*new, *step_args[2:])
      runs[method][1] = step_args
      rows[method]["probes"].append((before, common.matmul_rate()))

  total = sum(x.size for x in jax.tree.leaves(base))
  full = rows["full"]
  for row in rows.values():
    row["step_s"] = statistics.median(row["times"])
    row["step_vs_full"] = row["step_s"] / statistics.median(full["times"])
    row["peak_vs_full"] = row["peak_bytes"] / full["peak_bytes"]
    row["opt_state_vs_full"] = full["opt_state_bytes"] / row["opt_state_bytes"]
    row["trainable_pct"] = 100 * row["trainable_params"] / total
  probes = [p for row in rows.values() for pair in row["probes"] for p in pair]
  result = {
      "benchmark": "train_step", "model": args.model, "batch": args.batch, "seq": args.seq,
      "rank": args.rank, "targets": args.targets, "dtype": args.dtype, "total_params": total,
      "machine": common.machine(),
      "probe_gflops": {"min": min(probes), "max": max(probes)},
      "apply_vs_materialize_time": rows["lora_apply"]["step_s"] / rows["lora_materialize"]["step_s"],
      "apply_vs_materialize_peak": rows["lora_apply"]["peak_bytes"] / rows["lora_materialize"]["peak_bytes"],
      "methods": list(rows.values()),
  }
  print(f"{args.model} ({total:,} params), batch {args.batch}x{args.seq}, {args.dtype}, "
        f"{result['machine']['cpu']} x{result['machine']['cores']}")
  print(common.table(list(rows.values()), [
      ("method", "method", ""), ("trainable_params", "trainable", ",d"),
      ("trainable_pct", "% of total", ".3f"), ("step_s", "step s (median)", ".3f"),
      ("step_vs_full", "vs full", ".3f"), ("peak_bytes", "peak bytes", ",d"),
      ("peak_vs_full", "peak vs full", ".3f"), ("opt_state_bytes", "opt state bytes", ",d"),
      ("opt_state_vs_full", "full/this opt", ",.0f")]))
  print(f"apply / materialize: time {result['apply_vs_materialize_time']:.3f}, "
        f"peak memory {result['apply_vs_materialize_peak']:.3f}; matmul probe "
        f"{result['probe_gflops']['min']:.1f}-{result['probe_gflops']['max']:.1f} GFLOP/s")
  print(f"wrote {common.write_json(args.out, result)}")
  return result


if __name__ == "__main__":
  main()
