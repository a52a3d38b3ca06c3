"""Attention kernels on CPU: "reference" vs "chunked", forward + backward, time and peak memory.

    python -m benchmarks.attention                    # L = 256 ... 8192
    python -m benchmarks.attention --quick            # a smoke check
    python -m benchmarks.attention --tpu v5e:2x2      # compiled by libtpu: memory per chip

One causal self-attention (B=1, N=8 query heads over K=2 key/value heads, H=64, float32,
every key valid) and its gradient with respect to q, k and v, jitted; time is the median of
`--repeats` calls after compilation; memory is XLA's temporary buffers of the compiled
program (`compiled.memory_analysis().temp_size_in_bytes`: what the computation allocates
beyond its inputs and outputs). `models.attention.AUTO_CHUNKED_FROM` comes from this table.

With `--tpu TOPOLOGY` nothing runs: the gradient is compiled by the TPU compiler (libtpu, no
TPU needed) for Llama-3.1-8B's attention (N=32, K=8, H=128, bfloat16), one row per chip (the
rows split over the slice), and the table gives each kernel's temporaries per chip:
"reference", "chunked" and TPU's "splash".
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from models import attention
from train.machine import machine

COLUMNS = [
    ("length", "L", "d"),
    ("reference_ms", "reference ms", ".1f"),
    ("chunked_ms", "chunked ms", ".1f"),
    ("speedup", "chunked speedup", ".2f"),
    ("reference_temp_mib", "reference MiB", ".1f"),
    ("chunked_temp_mib", "chunked MiB", ".1f"),
]


def gradient_step(kernel: str, shape: tuple[int, int, int, int, int]):
    """The compiled gradient of sum(w · attention(q, k, v)) wrt (q, k, v), and its inputs."""
    B, L, N, K, H = shape
    keys = jax.random.split(jax.random.key(0), 4)
    q, w = (jax.random.normal(keys[i], (B, L, N, H)) for i in (0, 1))
    k, v = (jax.random.normal(keys[i], (B, L, K, H)) for i in (2, 3))
    segment_BxL = jnp.ones((B, L), jnp.int32)

    def loss(q, k, v, w):
        visible = attention.visibility(segment_BxL, segment_BxL, 0)
        return jnp.sum(w * attention.attend(q, k, v, visible, kernel))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return step.lower(q, k, v, w).compile(), (q, k, v, w)


def measure(kernel: str, shape, repeats: int) -> tuple[float, float]:
    """(median seconds per call, temporary MiB) of `gradient_step`."""
    compiled, inputs = gradient_step(kernel, shape)
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    jax.block_until_ready(compiled(*inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times), temp_mib


TPU_COLUMNS = [
    ("length", "L", "d"),
    ("reference_temp_gib", "reference GiB/chip", ".2f"),
    ("chunked_temp_gib", "chunked GiB/chip", ".2f"),
    ("splash_temp_gib", "splash GiB/chip", ".2f"),
]


def tpu_temp_bytes(kernel: str, L: int, topology: str) -> int:
    """Temporary bytes per chip of the attention gradient compiled for `topology`."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from train.mesh import AXES, with_activation_rules
    from train.plan import tpu_target

    devices = tpu_target(topology).devices
    mesh = Mesh(np.array(devices).reshape(-1, 1, 1), AXES)
    B, N, K, H = len(devices), 32, 8, 128
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    def loss(q, k, v, w):
        segment_BxL = jnp.ones((B, L), jnp.int32)
        visible = attention.visibility(segment_BxL, segment_BxL, 0)
        out = attention.attend(q, k, v, visible, kernel)
        return jnp.sum((w * out).astype(jnp.float32))

    step = with_activation_rules(jax.grad(loss, argnums=(0, 1, 2)), mesh)
    q = jax.ShapeDtypeStruct((B, L, N, H), jnp.bfloat16, sharding=rows)
    k = jax.ShapeDtypeStruct((B, L, K, H), jnp.bfloat16, sharding=rows)
    compiled = jax.jit(step).lower(q, k, k, q).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def tpu_main(args, argv) -> None:
    rows = []
    for L in args.lengths:
        row = {"length": L}
        for kernel in ("reference", "chunked", "splash"):
            row[f"{kernel}_temp_gib"] = tpu_temp_bytes(kernel, L, args.tpu) / 2**30
        rows.append(row)
        print(common.table([row], TPU_COLUMNS).splitlines()[-1], flush=True)
    print(common.table(rows, TPU_COLUMNS))
    payload = {
        "command": common.command("benchmarks.attention", argv),
        "topology": args.tpu,
        "shape": {"rows_per_chip": 1, "heads": 32, "kv_heads": 8, "head_dim": 128},
        "dtype": "bfloat16",
        "rows": rows,
    }
    print(f"wrote {common.write_json(args.out, payload)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096, 8192]
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tpu", metavar="TOPOLOGY", help="compile for a TPU slice, e.g. v5e:2x2")
    args = common.parse_args(
        parser,
        argv,
        {"lengths": [128, 640], "repeats": 1, "out": "benchmarks/results/attention_quick.json"},
    )
    if args.tpu:
        args.out = args.out or "benchmarks/results/attention_tpu.json"
        return tpu_main(args, argv)
    args.out = args.out or "benchmarks/results/attention.json"
    B, N, K, H = 1, 8, 2, 64
    rows, probe_before = [], common.matmul_rate()
    for L in args.lengths:
        row = {"length": L}
        for kernel in ("reference", "chunked"):
            seconds, temp_mib = measure(kernel, (B, L, N, K, H), args.repeats)
            row[f"{kernel}_ms"], row[f"{kernel}_temp_mib"] = 1e3 * seconds, temp_mib
        row["speedup"] = row["reference_ms"] / row["chunked_ms"]
        rows.append(row)
        print(common.table([row], COLUMNS).splitlines()[-1], flush=True)
    print(common.table(rows, COLUMNS))
    payload = {
        "command": common.command("benchmarks.attention", argv),
        "machine": machine(),
        "shape": {"batch": B, "heads": N, "kv_heads": K, "head_dim": H, "dtype": "float32"},
        "blocks": {"query": attention.BLOCK_Q, "key": attention.BLOCK_K},
        "matmul_gflops_before": probe_before,
        "matmul_gflops_after": common.matmul_rate(),
        "rows": rows,
    }
    print(f"wrote {common.write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
