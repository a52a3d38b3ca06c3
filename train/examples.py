"""Tokenised examples: (prompt, target) texts -> token ids with the prompt length.

An :class:`Example` is ``ids_L = prompt_ids + target_ids + [eos_id]``; tokens at
positions ``>= prompt_length`` are targets. Prompt and target are tokenised
separately (``add_special_tokens=False``, so the tokenizer's post-processor adds no
BOS/EOS of its own) and concatenated, so the prompt/target boundary is exact.

Length rules for a row of ``max_length`` tokens (:func:`fit_example`):

* ``prompt + 1 > max_length``: no room for a single target token -> ``prompt_too_long``
  (a malformed row, handled by ``data.on_malformed``);
* ``prompt + target + 1 > max_length``: ``too_long``, handled by ``data.on_too_long``;
  truncation keeps the whole prompt and cuts the *end* of the target (the EOS goes first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer


class Example(NamedTuple):
    ids_L: np.ndarray  # int32 [L], L <= max_length
    prompt_length: int  # tokens before the first target token


def encode_pairs(tokenizer: Tokenizer, prompts: Sequence[str], targets: Sequence[str],
                 eos_id: int) -> list[tuple[list[int], list[int]]]:
    """``[(prompt_ids, target_ids + [eos_id]), ...]``, one pair per (prompt, target)."""
    prompt_ids = tokenizer.encode_batch(list(prompts), add_special_tokens=False)
    target_ids = tokenizer.encode_batch(list(targets), add_special_tokens=False)
    return [(p.ids, t.ids + [eos_id]) for p, t in zip(prompt_ids, target_ids, strict=True)]


def length_status(n_prompt: int, n_target: int, max_length: int) -> str:
    """``'ok'``, ``'too_long'`` (target must be cut) or ``'prompt_too_long'`` (no room at all)."""
    if n_prompt + 1 > max_length:
        return "prompt_too_long"
    return "ok" if n_prompt + n_target <= max_length else "too_long"


def fit_example(prompt_ids: Sequence[int], target_ids: Sequence[int], max_length: int) -> Example:
    """The Example, its target's tail cut so that it has at most ``max_length`` tokens."""
    kept_target = list(target_ids)[: max_length - len(prompt_ids)]
    return Example(np.asarray(list(prompt_ids) + kept_target, np.int32), len(prompt_ids))
