"""Decoding speed of SmolLM2-135M on CPU: ours (`models.generate`) vs transformers `generate`.

    python -m benchmarks.decode                      # batch 1 and 16, 32 new tokens
    python -m benchmarks.decode --new-tokens 8 --batch-sizes 1   # a quick check

Both run float32 on the same prompts (left-padded ChatML prompts, greedy, EOS ignored so every
row generates `--new-tokens`). Prefill latency is one forward pass over the prompt batch;
decode throughput is (batch × new tokens) / (generate time − prefill time). Our functions are
compiled before timing; each figure is the median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import torch
import transformers

import models
from benchmarks import common
from train.machine import machine

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain photosynthesis briefly.",
    "Give me three tips for learning Python.",
    "What is 17 times 23?",
    "Describe a cat to a child.",
    "Why is the sky blue?",
    "Suggest a name for a coffee shop.",
]


def prompts(tokenizer, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ChatML prompts (ids, mask), (batch, length)."""
    rows = [
        tokenizer.encode(
            f"<|im_start|>user\n{QUESTIONS[i % len(QUESTIONS)]}<|im_end|>\n<|im_start|>assistant\n"
        ).ids
        for i in range(batch)
    ]
    length = max(map(len, rows))
    ids = np.array([[2] * (length - len(r)) + r for r in rows], np.int32)
    mask = np.array([[0] * (length - len(r)) + [1] * len(r) for r in rows], np.int32)
    return ids, mask


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (compilation for ours)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(model, params, ids, mask, new_tokens: int, repeats: int) -> tuple[float, float]:
    forward = jax.jit(model.apply)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    prefill = median_seconds(
        lambda: forward({"params": params}, ids, mask, positions).block_until_ready(), repeats
    )
    total = median_seconds(
        lambda: models.generate(
            model, params, ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=-1
        ).block_until_ready(),
        repeats,
    )
    return prefill, total


def theirs(hf, ids, mask, new_tokens: int, repeats: int) -> tuple[float, float]:
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)

    def prefill():
        with torch.no_grad():
            hf(input_ids=ids_t, attention_mask=mask_t, use_cache=True)

    def generate():
        with torch.no_grad():
            hf.generate(
                input_ids=ids_t,
                attention_mask=mask_t,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=2,
            )

    return median_seconds(prefill, repeats), median_seconds(generate, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    args = parser.parse_args()

    model, params, tokenizer = models.load("smollm2-135m")
    path = models.embedded_gguf("smollm2-135m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()

    rows, probe_before = [], common.matmul_rate()
    for batch in args.batch_sizes:
        ids, mask = prompts(tokenizer, batch)
        for name, (prefill, total) in [
            ("ours", ours(model, params, ids, mask, args.new_tokens, args.repeats)),
            ("transformers", theirs(hf, ids, mask, args.new_tokens, args.repeats)),
        ]:
            rows.append(
                {
                    "impl": name,
                    "batch": batch,
                    "prompt_len": ids.shape[1],
                    "new_tokens": args.new_tokens,
                    "prefill_ms": 1e3 * prefill,
                    "generate_s": total,
                    # separate medians can put generation under prefill (noise, --repeats 1):
                    # then there is no decode time to divide by, and no rate
                    "decode_tok_s": (
                        batch * args.new_tokens / (total - prefill) if total > prefill else None
                    ),
                }
            )
    columns = [
        ("impl", "impl", "s"),
        ("batch", "batch", "d"),
        ("prompt_len", "prompt", "d"),
        ("prefill_ms", "prefill ms", ".1f"),
        ("generate_s", "generate s", ".2f"),
        ("decode_tok_s", "decode tok/s", ".1f"),
    ]
    print(common.table(rows, columns))
    payload = {
        "benchmark": "decode",
        "model": "smollm2-135m (GGUF Q4_1 dequantised, float32)",
        "command": common.command("benchmarks.decode"),
        "machine": machine(),
        "matmul_gflops_before": probe_before,
        "matmul_gflops_after": common.matmul_rate(),
        "rows": rows,
    }
    print(f"wrote {common.write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
