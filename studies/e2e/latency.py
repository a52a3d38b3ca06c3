"""Batch-1 decoding latency of an experiment's rows, measured side by side in one process:
the LoRA paper's Table 1 column for the E2E table (adapters add latency, merged LoRA none).

Each row's model decodes as it would serve: a LoRA adapter merged into W (``lj.merge``:
the base's shapes, hence the base's compiled program), bottleneck adapters and prefixes
through their method's forward (train/method.py ``decoding_apply``), full fine-tuning and
the untrained base as they are. Each decodes one prompt (the experiment's first test MR)
at batch 1, greedily, ``new_tokens`` tokens with the EOS ignored, after one untimed
decode (compilation). Each of ``rounds`` rounds, between two numpy matmul probes
(train/machine.py ``matmul_rate``), has every row decode ``reps`` times in a row, the
rows' order rotated from round to round; short rounds keep the rows of one round in one
CPU regime. Over the rounds whose probes agree within 25% (all, flagged, when none do),
a row's figure is the median of its decodes in milliseconds per generated token, and its
ratio to the reference row the median of the per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

import lora_jax as lj
import models
from studies.e2e.evaluation import Target
from train.formats import e2e_prompt
from train.machine import matmul_rate, same_regime


@dataclass(frozen=True)
class LatencySpec:
    """How the experiment measures batch-1 latency (``new_tokens: 0``: not at all)."""

    new_tokens: int = 32
    rounds: int = 9
    reps: int = 1


def as_served(target: Target) -> Target:
    """``target`` as it would serve: LoRA factors merged into W; anything else unchanged."""
    if not any(jax.tree.leaves(lj.trainable_mask(target.params))):  # no LoRA factors
        return target
    return target._replace(params=lj.merge(target.params))


def measure(
    targets: dict[str, Target], mr: str, spec: LatencySpec, reference: str
) -> dict[str, Any]:
    """``{"rows": {name: {"ms_per_token", "vs_reference"}}, "valid_rounds", "probes",
    "rounds"}`` (``rounds``: every decode's seconds, per round and row)
    for ``targets`` (already :func:`as_served`), each decoding the prompt of ``mr``; the
    ratios are to ``targets[reference]`` (module docstring)."""
    calls = {}
    for name, target in targets.items():
        ids = target.tokenizer.encode(e2e_prompt(mr), add_special_tokens=False).ids
        prompt_1xP = np.asarray([ids], np.int32)

        def decode(target=target, prompt_1xP=prompt_1xP):
            out = models.generate(
                target.model,
                target.params,
                prompt_1xP,
                max_new_tokens=spec.new_tokens,
                eos_token_id=-1,
                apply_fn=target.apply_fn,
            )
            return jax.block_until_ready(out)

        decode()  # compile
        calls[name] = decode
    names = list(calls)
    rounds, probes = [], []  # per round: {name: [seconds, ...]}; (before, after)
    for r in range(spec.rounds):
        before, this = matmul_rate(), {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            this[name] = []
            for _ in range(spec.reps):
                start = time.perf_counter()
                calls[name]()
                this[name].append(time.perf_counter() - start)
        rounds.append(this)
        probes.append((before, matmul_rate()))
    valid = [i for i, pair in enumerate(probes) if same_regime(list(pair))]
    use = valid or list(range(len(rounds)))
    rows = {}
    for name in names:
        ratios = [
            statistics.median(rounds[i][name]) / statistics.median(rounds[i][reference])
            for i in use
        ]
        every = [t for i in use for t in rounds[i][name]]
        rows[name] = {
            "ms_per_token": 1e3 * statistics.median(every) / spec.new_tokens,
            "vs_reference": statistics.median(ratios),
        }
    flat = [p for pair in probes for p in pair]
    return {
        "rows": rows,
        "reference": reference,
        "valid_rounds": valid,
        "ratios_from_all_rounds": not valid,
        "probe_gflops": {"min": min(flat), "max": max(flat)},
        "spec": {"new_tokens": spec.new_tokens, "rounds": spec.rounds, "reps": spec.reps},
        "rounds": rounds,
        "probes": probes,
    }
