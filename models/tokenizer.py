"""Tokenizers (`tokenizers.Tokenizer`) from a tokenizer.json or from GGUF vocabulary metadata.

GGUF byte-level BPE vocabularies are rebuilt to match llama.cpp's tokenisation exactly: the
"smollm" pre-tokenizer first isolates every numeric character (regex \\p{N}), then applies the
GPT-2 split; this is also what SmolLM2's own tokenizer.json does. (transformers' GGUF converter
omits the digit split and disagrees on strings such as "a  1".)
"""

from __future__ import annotations

from pathlib import Path

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# GGUF "tokenizer.ggml.pre" values whose llama.cpp pre-tokenizer this module reproduces.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")
_GPT2_PRE = ("gpt2", "default", "mpt", "olmo", "jais")


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> Tokenizer:
    """Byte-level BPE tokenizer from a GGUF file's `tokenizer.ggml.*` metadata, with its control
    tokens (e.g. ChatML's <|im_start|>, <|im_end|>) registered as special tokens."""

    def get(key):
        return reader.fields[key].contents() if key in reader.fields else None

    kind, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre") or "default"
    if kind != "gpt2" or pre not in _DIGIT_SPLIT_PRE + _GPT2_PRE:
        raise ValueError(
            f"unsupported GGUF tokenizer model={kind!r} pre={pre!r}; supported: byte-level BPE "
            f"(model 'gpt2') with pre-tokenizer in {_DIGIT_SPLIT_PRE + _GPT2_PRE}"
        )
    tokens = get("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        digits = pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    types = get("tokenizer.ggml.token_type")
    control = [t for t, kind in zip(tokens, types) if kind == gguf.TokenType.CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tokenizer


def tokenizer_from_dir(directory: Path) -> Tokenizer | None:
    """`directory/tokenizer.json`, or None when the checkpoint ships no tokenizer.json."""
    file = directory / "tokenizer.json"
    return Tokenizer.from_file(str(file)) if file.is_file() else None
