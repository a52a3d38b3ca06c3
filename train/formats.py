"""Task formatters: one table row -> (prompt text, target text).

The model is trained on ``prompt + target + EOS`` with the loss on the target and EOS
only (the conditional language-modelling objective, eq. 2 of the LoRA paper).

E2E (``format: e2e``, columns ``mr`` and ``ref``) uses the ChatML chat template that
SmolLM2-135M-Instruct was tuned with, one user turn holding the meaning
representation and the reference as the assistant's answer::

    prompt = "<|im_start|>user\\nDescribe this restaurant in one sentence: {mr}<|im_end|>\\n"
             "<|im_start|>assistant\\n"
    target = "{ref}"            # the pipeline then appends EOS = <|im_end|>, closing the turn

ChatML rather than the paper's plain ``mr || ref`` layout: the base model already
answers in this template (so generations are sensible before fine-tuning) and its EOS,
``<|im_end|>``, is exactly the end of an assistant turn. The cost is ~10 prompt tokens.

Columns are found by name, ignoring case, surrounding spaces and a byte-order mark, and
under the other names a format knows for them (E2E's: Hugging Face ``e2e_nlg``'s).

``prompt_completion`` (columns ``prompt``, ``completion``) concatenates the two as they
are: the data carries its own template. ``text`` (column ``text``) has an empty prompt,
so every token is a target (plain language modelling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

E2E_INSTRUCTION = "Describe this restaurant in one sentence: "


class MalformedRow(ValueError):
    """A row that cannot be formatted; ``reason`` is a short tag used to count skips."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def chatml_user_turn(text: str) -> str:
    """A ChatML user turn followed by the opening of the assistant's answer."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def find_columns(
    columns: Sequence[str],
    names: Sequence[str],
    aliases: Mapping[str, tuple[str, ...]] | None = None,
) -> dict[str, str | None]:
    """For each of ``names``, the column of ``columns`` holding it, or None.

    The same name if present; else the first column that equals the name or one of its
    ``aliases`` once case, surrounding spaces and a byte-order mark are ignored.

    >>> find_columns(["\ufeffMR", "human_reference", "other"], ["mr", "ref", "text"],
    ...              FORMATS["e2e"].aliases)
    {'mr': '\ufeffMR', 'ref': 'human_reference', 'text': None}
    """
    aliases = aliases or {}
    by_key = {c.lstrip("\ufeff").strip().lower(): c for c in columns}
    return {
        name: name
        if name in columns
        else next((by_key[k] for k in (name, *aliases.get(name, ())) if k in by_key), None)
        for name in names
    }


def is_missing(value: Any) -> bool:
    """None, or the NaN that CSV readers put in an empty cell."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def text_field(row: Mapping[str, Any], column: str) -> str:
    """The non-empty string in ``row[column]``; MalformedRow('missing'|'not_string'|'empty')."""
    value = row.get(column)
    if is_missing(value):
        raise MalformedRow("missing", f"column '{column}' is missing (null/NaN)")
    if not isinstance(value, str):
        raise MalformedRow(
            "not_string", f"column '{column}' is {type(value).__name__} {value!r}, not a string"
        )
    if not value.strip():
        raise MalformedRow("empty", f"column '{column}' is empty")
    return value


def e2e_prompt(mr: str) -> str:
    """The prompt of an E2E meaning representation: all the model sees before its answer."""
    return chatml_user_turn(E2E_INSTRUCTION + mr)


def _e2e(row: Mapping[str, Any]) -> tuple[str, str]:
    return e2e_prompt(text_field(row, "mr")), text_field(row, "ref")


def _prompt_completion(row: Mapping[str, Any]) -> tuple[str, str]:
    return text_field(row, "prompt"), text_field(row, "completion")


def _text(row: Mapping[str, Any]) -> tuple[str, str]:
    return "", text_field(row, "text")


@dataclass(frozen=True)
class Format:
    """The columns a task reads, its default grouping column, its row formatter, and other
    names its columns go by."""

    columns: tuple[str, ...]
    split_key: str | None  # None: every row is its own group
    build: Callable[[Mapping[str, Any]], tuple[str, str]]
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


FORMATS: dict[str, Format] = {
    # aliases: Hugging Face e2e_nlg's names, and the E2E challenge's own CSVs' header
    "e2e": Format(
        ("mr", "ref"),
        "mr",
        _e2e,
        {"mr": ("meaning_representation",), "ref": ("reference", "human_reference")},
    ),
    "prompt_completion": Format(("prompt", "completion"), "prompt", _prompt_completion),
    "text": Format(("text",), None, _text),
}
