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

Before tokenising, a prompt or target text longer than :func:`char_limit` characters is cut
to that many (``train/data.py`` counts it in ``DataReport.cut``): such a text holds far more
than ``max_length`` tokens, so the example is too long either way, and the tokenizer never
has to encode (and hold the offsets of) a 10 MB field only for all but its start to be
dropped. The limit is ``CUT_MARGIN * (max_length + 1) * longest``, where ``longest`` is the
length of the tokenizer's longest vocabulary entry: a token covers at most that many
characters (a byte-level token's entry has one character per byte, and a character is at
least a byte), so the cut text still yields more than ``CUT_MARGIN * (max_length + 1)``
tokens, and its first ``max_length`` are those of the whole text (the cut only changes the
tokens of the last pre-tokenised word). A normaliser that deletes characters, or BPE over
one word of more than ``limit`` characters, could in principle break that; the margin of 4
covers contractions such as NFC's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer

CUT_MARGIN = 4  # tokens the cut text may yield, as a multiple of max_length + 1 (at least)


class Example(NamedTuple):
    ids_L: np.ndarray  # int32 [L], L <= max_length
    prompt_length: int  # tokens before the first target token


def encode_pairs(
    tokenizer: Tokenizer, prompts: Sequence[str], targets: Sequence[str], eos_id: int
) -> list[tuple[list[int], list[int]]]:
    """``[(prompt_ids, target_ids + [eos_id]), ...]``, one pair per (prompt, target)."""
    prompt_ids = tokenizer.encode_batch(list(prompts), add_special_tokens=False)
    target_ids = tokenizer.encode_batch(list(targets), add_special_tokens=False)
    return [(p.ids, t.ids + [eos_id]) for p, t in zip(prompt_ids, target_ids, strict=True)]


def char_limit(tokenizer: Tokenizer, max_length: int) -> int:
    """Characters of a prompt or target text kept before tokenising (module docstring)."""
    longest = max(map(len, tokenizer.get_vocab(with_added_tokens=True)), default=1)
    return CUT_MARGIN * (max_length + 1) * max(longest, 1)


def length_status(n_prompt: int, n_target: int, max_length: int) -> str:
    """``'ok'``, ``'too_long'`` (target must be cut) or ``'prompt_too_long'`` (no room at all)."""
    if n_prompt + 1 > max_length:
        return "prompt_too_long"
    return "ok" if n_prompt + n_target <= max_length else "too_long"


def fit_example(prompt_ids: Sequence[int], target_ids: Sequence[int], max_length: int) -> Example:
    """The Example, its target's tail cut so that it has at most ``max_length`` tokens."""
    kept_target = list(target_ids)[: max_length - len(prompt_ids)]
    return Example(np.asarray(list(prompt_ids) + kept_target, np.int32), len(prompt_ids))
