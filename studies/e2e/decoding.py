"""How the E2E study decodes: :class:`Decoding` and the LoRA paper's settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decoding:
    """How outputs are decoded (``models.generate`` arguments)."""

    num_beams: int = 10
    length_penalty: float = 0.9
    no_repeat_ngram_size: int = 4
    # of the output only, as the paper's examples/NLG/src/gpt2_beam.py bans: copying an
    # MR's value ("5 out of 5") is the task, and a tokenizer that splits digits off
    # ("of", " ", "5") would otherwise be pushed off the copy ("of5")
    no_repeat_ngram_scope: str = "output"
    max_new_tokens: int = 64


PAPER_DECODING = Decoding()  # the LoRA paper's E2E decoding (its examples/NLG)
