"""Greedy generations for validation prompts, shown next to their references."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

import models
from train.examples import Example


@dataclass(frozen=True)
class Sample:
    prompt: str
    generated: str
    reference: str


def distinct_prompts(examples: Sequence[Example], count: int) -> list[Example]:
    """The first ``count`` examples whose prompts differ (E2E: one per meaning representation)."""
    chosen: dict[bytes, Example] = {}
    for example in examples:
        chosen.setdefault(example.ids_L[: example.prompt_length].tobytes(), example)
        if len(chosen) == count:
            break
    return list(chosen.values())


def left_padded_prompts(
    examples: Sequence[Example], pad_id: int, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, attention mask), both int32 [N, P], right-aligned (padding on the left).

    P is ``length`` (one compiled program for every batch), else the longest prompt.
    """
    length = length or max(e.prompt_length for e in examples)
    ids_NxP = np.full((len(examples), length), pad_id, np.int32)
    mask_NxP = np.zeros((len(examples), length), np.int32)
    for row, example in enumerate(examples):
        ids_NxP[row, length - example.prompt_length :] = example.ids_L[: example.prompt_length]
        mask_NxP[row, length - example.prompt_length :] = 1
    return ids_NxP, mask_NxP


def decode_text(tokenizer: Tokenizer, ids: Sequence[int], eos_id: int) -> str:
    """The text of ``ids`` up to (without) the first EOS, stripped."""
    ids = [int(i) for i in ids]
    return tokenizer.decode(ids[: ids.index(eos_id)] if eos_id in ids else ids).strip()


def generate_samples(
    model: models.Decoder,
    params: Any,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    eos_id: int,
    max_new_tokens: int,
    apply_fn: Callable[..., Any] | None = None,
) -> list[Sample]:
    """Greedy continuations of the examples' prompts (``models.generate``; LoRA leaves in
    ``params`` run the factored forward; ``apply_fn``: the method's, train/method.py
    ``decoding_apply``), decoded up to EOS, with the target as reference.
    """
    if not examples:
        return []
    ids_NxP, mask_NxP = left_padded_prompts(examples, eos_id)
    new_NxT = np.asarray(
        models.generate(
            model,
            params,
            ids_NxP,
            attention_mask=mask_NxP,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            apply_fn=apply_fn,
        )
    )

    def text(ids) -> str:
        return decode_text(tokenizer, ids, eos_id)

    return [
        Sample(
            prompt=text(e.ids_L[: e.prompt_length]),
            generated=text(row),
            reference=text(e.ids_L[e.prompt_length :]),
        )
        for e, row in zip(examples, new_NxT, strict=True)
    ]
