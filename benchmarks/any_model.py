"""LoRA train step of a model built from a custom Linen layer: `lj.apply` (the jaxpr rewrite)
vs `lj.materialize`, side by side.

    python -m benchmarks.any_model            # 4 scanned blocks 512 → 2048 → 512, 4×128 tokens
    python -m benchmarks.any_model --quick    # tiny shapes, 1 round: a smoke check

The model is what no stock layer computes: ``nn.scan`` over ``nn.remat`` blocks of a
``Linear`` of the user's own (``self.param`` + ``lax.dot_general``), up and down
projections with a residual. Every kernel is adapted (rank `--rank`). Each method's step
(forward, backward, AdamW update of the factors) is jitted once; the same shapes built of
``nn.Dense`` run through the interceptor as the reference for what the factored computation
costs on the machine. Then the methods are timed
in alternating rounds with a numpy matmul probe around each (the CPU regime). Memory is
XLA's accounting of the compiled step: temporaries (what the step allocates beyond its
arguments and outputs) and the peak (arguments + outputs + temporaries − donated aliases).
Weights are random: speed and memory do not depend on their values.
"""

from __future__ import annotations

import argparse
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

import lora_jax as lj
from benchmarks import common
from train.machine import machine

# rewrite: lj.apply on the custom layers; interceptor: lj.apply on the same shapes built of
# nn.Dense (the stock path, the reference for the factored computation's cost);
# materialize: the custom layers on W + s·A·B.
METHODS = ("rewrite", "interceptor", "materialize")
QUICK = {"hidden": 64, "mlp": 256, "layers": 2, "batch": 2, "seq": 16, "rounds": 1, "steps": 1}
COLUMNS = [
    ("method", "method", ""),
    ("step_s", "step s (median)", ".4f"),
    ("step_vs_materialize", "vs materialize", ".3f"),
    ("gflops", "GFLOP (XLA)", ".2f"),
    ("temp_bytes", "temp bytes", ",d"),
    ("temp_vs_materialize", "vs materialize", ".3f"),
    ("peak_bytes", "peak bytes", ",d"),
]


class Linear(nn.Module):
    """A dense layer of the user's own: no nn.Dense for the interceptor to see."""

    features: int

    @nn.compact
    def __call__(self, x_BxLxI):
        w_IxO = self.param(
            "kernel", nn.initializers.lecun_normal(), (x_BxLxI.shape[-1], self.features)
        )
        return lax.dot_general(x_BxLxI, w_IxO, (((x_BxLxI.ndim - 1,), (0,)), ((), ())))


def _dense(features: int, name: str) -> nn.Module:
    return nn.Dense(features, use_bias=False, name=name)


def _custom(features: int, name: str) -> nn.Module:
    return Linear(features, name=name)


class Block(nn.Module):
    mlp: int
    stock: bool  # nn.Dense (the interceptor's) instead of the custom Linear (the rewrite's)

    @nn.compact
    def __call__(self, h_BxLxD, _):
        layer = _dense if self.stock else _custom
        u_BxLxM = jax.nn.gelu(layer(self.mlp, "up")(h_BxLxD))
        return h_BxLxD + layer(h_BxLxD.shape[-1], "down")(u_BxLxM), None


class Stack(nn.Module):
    mlp: int
    layers: int
    stock: bool = False

    @nn.compact
    def __call__(self, x_BxLxD):
        scan = nn.scan(
            nn.remat(Block),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
        )
        h_BxLxD, _ = scan(self.mlp, self.stock, name="blocks")(x_BxLxD, None)
        return h_BxLxD


def build(method: str, model: Stack, adapted, x_BxLxD):
    """(jitted step, its args): grad of a mean-square loss w.r.t. the factors, AdamW."""
    frozen, trainable = lj.split(adapted)
    tx = lj.optimizer(optax.adamw(1e-4), trainable)
    if method == "materialize":
        forward = lambda p, x: model.apply({"params": lj.materialize(p)}, x)  # noqa: E731
    else:
        forward = lambda p, x: lj.apply(model.apply)({"params": p}, x)  # noqa: E731

    def step(trainable, opt_state, frozen, x):
        loss, grads = jax.value_and_grad(
            lambda t: jnp.mean(forward(lj.combine(frozen, t), x) ** 2)
        )(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return loss, optax.apply_updates(trainable, updates), opt_state

    trainable = jax.tree.map(jnp.copy, trainable)  # donated; the other method keeps its own
    return jax.jit(step, donate_argnums=(0, 1)), (trainable, tx.init(trainable), frozen, x_BxLxD)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--mlp", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
    parser.add_argument("--out", default="benchmarks/results/any_model.json")
    args = common.parse_args(parser, argv, QUICK)

    x_BxLxD = jax.random.normal(jax.random.key(0), (args.batch, args.seq, args.hidden))
    config = lj.LoraConfig(args.rank, 2 * args.rank, r".*kernel")

    runs, rows = {}, {}
    for method in METHODS:
        model = Stack(args.mlp, args.layers, stock=method == "interceptor")
        base = jax.jit(model.init)(jax.random.key(1), x_BxLxD)["params"]
        adapted = lj.init(jax.random.key(2), base, config)
        jitted, step_args = build(method, model, adapted, x_BxLxD)
        compiled = jitted.lower(*step_args).compile()
        stats = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        loss, *new = jitted(*step_args)  # compile + first step
        jax.block_until_ready(loss)
        runs[method] = [jitted, (*new, *step_args[2:])]
        rows[method] = {
            "method": method,
            "gflops": cost["flops"] / 1e9,
            "temp_bytes": int(stats.temp_size_in_bytes),
            "peak_bytes": common.peak_bytes(stats),
            "times": [],
            "probes": [],
        }

    common.timed_rounds(runs, rows, args.rounds, args.steps)

    reference = rows["materialize"]
    for row in rows.values():
        row["step_s"] = statistics.median(row["times"])
        row["step_vs_materialize"] = row["step_s"] / statistics.median(reference["times"])
        row["temp_vs_materialize"] = row["temp_bytes"] / max(reference["temp_bytes"], 1)
    probes = [p for row in rows.values() for pair in row["probes"] for p in pair]
    result = {
        "benchmark": "any_model",
        "shape": {k: getattr(args, k) for k in ("hidden", "mlp", "layers", "batch", "seq")},
        "rank": args.rank,
        "command": common.command("benchmarks.any_model", argv),
        "machine": machine() | {"device_kind": jax.devices()[0].device_kind},
        "probe_gflops": {"min": min(probes), "max": max(probes)},
        "one_regime": common.same_regime(probes),
        "methods": list(rows.values()),
    }
    print(
        f"{args.layers} scanned custom-Linear blocks {args.hidden} → {args.mlp} → {args.hidden}, "
        f"batch {args.batch}x{args.seq}, rank {args.rank}, {result['machine']['cpu']} "
        f"x{result['machine']['cores']}"
    )
    print(common.table(list(rows.values()), COLUMNS))
    print(
        f"matmul probe {result['probe_gflops']['min']:.1f}-{result['probe_gflops']['max']:.1f} "
        f"GFLOP/s ({'one regime' if result['one_regime'] else 'the regime changed: rerun'})"
    )
    print(f"wrote {common.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
