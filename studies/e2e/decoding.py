"""How the E2E study decodes: :class:`Decoding` and the LoRA paper's settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decoding:
    """How outputs are decoded (``models.generate`` arguments)."""

    num_beams: int = 10
    length_penalty: float = 0.9
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64


PAPER_DECODING = Decoding()  # the LoRA paper's E2E decoding (its examples/NLG)
