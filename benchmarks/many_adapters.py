"""Many adapters on one base (issue 17): mixed-adapter batches vs one merged adapter vs the base.

    python -m benchmarks.many_adapters            # SmolLM2-135M, batch 16, k = 1, 4, 16
    python -m benchmarks.many_adapters --quick    # tiny model, a smoke check

Three tables, each measured side by side in one run (variants timed in alternating rounds,
the median per variant; a numpy matmul probe before and after records the CPU regime):

* decode: `models.generate` (greedy, `--new-tokens` per row, EOS ignored) of a batch of 16
  prompts with the base, the single adapter merged into W, the single adapter factored
  (`lj.apply`), and a bank whose 16 rows use k = 1, 4, 16 distinct adapters
  (``adapter_ids = row % k``); tokens/s and the ratio to the merged adapter and to the base.
* train: one jitted step (forward, backward, AdamW) on `--batch` x `--seq` tokens training a
  single adapter vs a bank of 16 adapters, one per row (each row's gradient reaches its own
  slot); the ratio of their step times.
* kernel: the bank's low-rank term s·(x·A_ids)·B_ids alone at a (fan_in, fan_out) of the
  model, rank `--rank`, 16 rows, for the kernels `lj.apply` could use: gather each row's
  factors and batch the two contractions over rows (what `lj.apply` does), one-hot over the
  n slots (every slot's contraction, then a select: work x n), and `lax.ragged_dot` over
  the rows sorted by slot (sort, grouped matmul, unsort).

Adapters are rank `--rank` on q/k/v/o with random non-zero A and B (speed does not depend on
the values). float32 throughout.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
import models
from benchmarks import common
from benchmarks.decode import prompts
from train.machine import machine
from train.step import token_losses

TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj)/kernel"
SLOTS = 16  # the bank's size, one adapter per row of a 16-row batch
QUICK = {"model": "tiny-llama", "new_tokens": 4, "seq": 16, "rounds": 1, "kernel_rounds": 3}


def random_adapters(base, n: int, rank: int, seed: int = 0) -> list:
    """n adapters of `base` (rank `rank` on TARGETS) with A, B ~ N(0, 0.02²), drawn by numpy."""
    rng = np.random.default_rng(seed)
    config = lj.LoraConfig(rank, 2.0 * rank, TARGETS)
    shapes = jax.eval_shape(lambda: lj.adapter(lj.init(jax.random.key(0), base, config)))
    return [
        jax.tree_util.tree_map_with_path(
            lambda path, leaf: (
                jnp.full(leaf.shape, 2.0, leaf.dtype)
                if "scale" in jax.tree_util.keystr(path)
                else jnp.asarray(0.02 * rng.standard_normal(leaf.shape), leaf.dtype)
            ),
            shapes,
        )
        for _ in range(n)
    ]


def timed(fns: dict, rounds: int) -> dict:
    """Median seconds of each zero-argument function, after one warm-up call each (the
    compilation), timed in alternating rounds."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def decode_rows(model, base, adapters, ids, mask, new_tokens, rounds) -> list[dict]:
    batch = ids.shape[0]
    gen = lambda params, **kw: (
        lambda: models.generate(
            model,
            params,
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            eos_token_id=-1,
            **kw,
        )
    )
    bank = lj.combine(base, lj.stack(adapters))
    variants = {
        "base": gen(base),
        "merged single adapter": gen(lj.merge(lj.combine(base, adapters[0]))),
        "factored single adapter": gen(lj.combine(base, adapters[0])),
        **{
            f"bank, k = {k}": gen(bank, adapter_ids=jnp.arange(batch, dtype=jnp.int32) % k)
            for k in (1, 4, SLOTS)
        },
    }
    seconds = timed(variants, rounds)
    rate = {name: batch * new_tokens / s for name, s in seconds.items()}
    return [
        {
            "variant": name,
            "seconds": seconds[name],
            "tokens_per_s": rate[name],
            "vs_merged": rate[name] / rate["merged single adapter"],
            "vs_base": rate[name] / rate["base"],
        }
        for name in variants
    ]


def train_rows(model, base, adapters, batch, seq, rounds) -> list[dict]:
    ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, model.config.vocab_size)
    tx = optax.adamw(1e-4)

    def make_step(params, **kw):
        frozen, trainable = lj.split(params)  # the base, scales and ranks stay frozen

        def loss(trainable):
            logits = lj.apply(model.apply)({"params": lj.combine(frozen, trainable)}, ids, **kw)
            return jnp.mean(token_losses(logits, ids, 0.0))

        @jax.jit
        def step(trainable, opt_state):
            grads = jax.grad(loss)(trainable)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state

        state = tx.init(trainable)
        return lambda: step(trainable, state)

    row_ids = jnp.arange(batch, dtype=jnp.int32) % SLOTS
    variants = {
        "single adapter": make_step(lj.combine(base, adapters[0])),
        f"bank, k = {SLOTS}": make_step(lj.combine(base, lj.stack(adapters)), adapter_ids=row_ids),
    }
    seconds = timed(variants, rounds)
    return [
        {"variant": name, "seconds": s, "vs_single": seconds["single adapter"] / s}
        for name, s in seconds.items()
    ]


def kernel_rows(fan_in, fan_out, rank, tokens, rounds) -> list[dict]:
    rng = np.random.default_rng(0)
    n, rows = SLOTS, SLOTS
    x = jnp.asarray(rng.standard_normal((rows, tokens, fan_in)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((n, fan_in, rank)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((n, rank, fan_out)), jnp.float32)
    s = jnp.ones((n,), jnp.float32)

    @jax.jit
    def gather(x_BxLxD, ids_B):
        a_B, b_B, s_B = a[ids_B], b[ids_B], s[ids_B]
        xa = jnp.einsum("bld,bdr,b->blr", x_BxLxD, a_B, s_B)
        return jnp.einsum("blr,bro->blo", xa, b_B)

    @jax.jit
    def one_hot(x_BxLxD, ids_B):
        pick_BxN = jax.nn.one_hot(ids_B, n, dtype=x_BxLxD.dtype) * s
        xa_all = jnp.einsum("bld,ndr->blnr", x_BxLxD, a)
        return jnp.einsum("blnr,bn,nro->blo", xa_all, pick_BxN, b)

    @jax.jit
    def ragged(x_BxLxD, ids_B):
        order = jnp.argsort(ids_B, stable=True)
        sizes = jnp.bincount(ids_B, length=n).astype(jnp.int32)
        x_MxD = x_BxLxD[order].reshape(-1, fan_in)
        xa = jax.lax.ragged_dot(x_MxD, a * s[:, None, None], sizes * tokens)
        y = jax.lax.ragged_dot(xa, b, sizes * tokens).reshape(rows, tokens, fan_out)
        return jnp.zeros_like(y).at[order].set(y)

    out = []
    for k in (1, 4, n):
        ids = jnp.arange(rows, dtype=jnp.int32) % k
        kernels = {"gather + batched einsum": gather, "one-hot": one_hot, "ragged_dot": ragged}
        expected = gather(x, ids)
        for fn in kernels.values():  # one computation, three kernels
            np.testing.assert_allclose(fn(x, ids), expected, rtol=1e-4, atol=1e-3)
        seconds = timed({name: (lambda f=f: f(x, ids)) for name, f in kernels.items()}, rounds)
        out += [
            {
                "k": k,
                "tokens": tokens,
                "kernel": name,
                "ms": 1e3 * t,
                "vs_gather": t / seconds["gather + batched einsum"],
            }
            for name, t in seconds.items()
        ]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="train step rows")
    parser.add_argument("--seq", type=int, default=32, help="train step tokens per row")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kernel-rounds", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/many_adapters.json")
    args = common.parse_args(parser, argv, QUICK)

    if args.model == "tiny-llama":
        cfg = models.get_config("tiny-llama")
        model, base = models.Decoder(cfg), models.init_params(cfg, jax.random.key(0))
        ids = np.asarray(jax.random.randint(jax.random.key(2), (SLOTS, 8), 1, cfg.vocab_size))
        mask = np.ones_like(ids)
    else:
        model, base, tokenizer = models.load(args.model)
        ids, mask = prompts(tokenizer, SLOTS)
    adapters = random_adapters(base, SLOTS, args.rank)
    cfg = model.config

    probe_before = common.matmul_rate()
    decode = decode_rows(model, base, adapters, ids, mask, args.new_tokens, args.rounds)
    train = train_rows(model, base, adapters, args.batch, args.seq, args.rounds)
    kernel = [
        row
        for tokens in (1, args.seq)
        for row in kernel_rows(
            cfg.hidden_size, cfg.hidden_size, args.rank, tokens, args.kernel_rounds
        )
    ]
    probe_after = common.matmul_rate()

    print(f"decode: batch {SLOTS}, {args.new_tokens} new tokens per row, rank {args.rank}")
    print(
        common.table(
            decode,
            [
                ("variant", "variant", "s"),
                ("seconds", "s", ".3f"),
                ("tokens_per_s", "tok/s", ".1f"),
                ("vs_merged", "x merged", ".3f"),
                ("vs_base", "x base", ".3f"),
            ],
        )
    )
    print(f"\ntrain step: {args.batch} x {args.seq} tokens")
    print(
        common.table(
            train,
            [
                ("variant", "variant", "s"),
                ("seconds", "s", ".3f"),
                ("vs_single", "x single", ".3f"),
            ],
        )
    )
    print(f"\nbank term alone: {cfg.hidden_size} -> {cfg.hidden_size}, {SLOTS} rows, n = {SLOTS}")
    print(
        common.table(
            kernel,
            [
                ("kernel", "kernel", "s"),
                ("tokens", "tokens/row", "d"),
                ("k", "k", "d"),
                ("ms", "ms", ".3f"),
                ("vs_gather", "x gather time", ".2f"),
            ],
        )
    )
    payload = {
        "benchmark": "many_adapters",
        "model": args.model,
        "rank": args.rank,
        "command": common.command("benchmarks.many_adapters", argv),
        "machine": machine(),
        "matmul_gflops_before": probe_before,
        "matmul_gflops_after": probe_after,
        "same_regime": common.same_regime([probe_before, probe_after]),
        "decode": decode,
        "train": train,
        "kernel": kernel,
    }
    print(f"wrote {common.write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
