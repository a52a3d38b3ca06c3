"""``lora-jax eval``: decode every distinct MR of an E2E CSV and score it against all its refs.

    lora-jax eval CONFIG_OR_RUN_DIR [RUN_DIR ...] --data PATH [--out DIR]
                  [--greedy | --num-beams N] [--limit N] [--batch-size N] [--max-new-tokens N]

CONFIG_OR_RUN_DIR is what to evaluate:

* a YAML run config (``configs/*.yaml``): its base model (section ``model``), untrained;
* a run directory or its ``adapter/`` (train/adapter.py): the base with the adapter, a
  LoRA adapter unmerged (``models.generate`` runs it through ``lj.apply``), bottleneck
  adapters (adapter_h, adapter_l) run by their method's forward (train/method.py
  ``decoding_apply``);
* a model that ``models.load`` reads: a Hugging Face checkpoint directory such as the
  output of ``lora-jax merge`` (merged params), a ``.gguf`` file or an embedded name.

``--data`` is a CSV with columns ``mr`` and ``ref``, one row per reference (relative
paths are relative to the current directory); a row with a missing or empty field is an
error naming the row. Each distinct MR is decoded once, in order of first appearance,
from the prompt that training builds for it (train/formats.py ``e2e_prompt``, tokenised
without special tokens as train/examples.py does), up to ``--max-new-tokens`` tokens or
the EOS (the run config's ``data.eos_token``, else the model's own). Decoding is the LoRA
paper's beam search by default (:data:`PAPER_DECODING`: 10 beams, length penalty 0.9, no
4-gram repeated within the output; the prompt's may be copied); ``--greedy`` keeps one beam
(and the 4-gram ban) for quick runs. MRs go
in batches of ``--batch-size``, every batch padded to the same shape so that one
compiled program serves them all.

The outputs are scored against all references of their MR (studies/e2e/metrics.py, whose
docstring says which implementations and how they differ from the challenge's scripts).
With ``--out DIR``::

    predictions.txt  one output per line, one line per distinct MR, in order of first
                     appearance in the CSV (line breaks inside an output become spaces)
    scores.json      {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}: BLEU 0-100, the
                     others on the challenge script's scales; METEOR null without WordNet
    scores.md        the scores as a table (also on the paper's scale), with the settings

DIR must be new, empty or an earlier ``--out`` of ``lora-jax eval`` (train/rundir.py).

Several run or adapter directories of LoRA adapters of one base are decoded together, in
one pass over the MRs: their adapters go into one bank (``lj.stack``) and every batch holds
each MR once per adapter, each row decoding with its own (``models.generate(...,
adapter_ids=)``). Each adapter gets its own scores, as if evaluated alone (the same tokens,
up to float rounding at a near tie), and with ``--out DIR`` its own files in
``DIR/<i>-<name>/`` (i: its position on the command line, name: its run directory's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

import lora_jax as lj
import models
from studies.e2e import metrics as e2e_metrics
from studies.e2e.decoding import PAPER_DECODING, Decoding
from train import layout, rundir
from train.adapter import AdapterError, load_adapter, read_meta
from train.config import load_config
from train.data import DataError, load_table, select_columns
from train.data import eos_id as data_eos_id
from train.examples import Example
from train.export import adapter_dir, load_adapted
from train.formats import FORMATS, MalformedRow, e2e_prompt, find_columns, text_field
from train.method import decoding_apply
from train.samples import decode_text, left_padded_prompts
from train.setup import load_model

PREDICTIONS_FILE = "predictions.txt"
SCORES_FILE = "scores.json"
REPORT_FILE = "scores.md"
CONFIG_SUFFIXES = (".yaml", ".yml")


class Target(NamedTuple):
    """A model to evaluate, ready for ``models.generate``."""

    model: models.Decoder
    params: Any
    tokenizer: Tokenizer
    eos_token: str | None  # None: the model's own EOS token
    description: str
    slots: int = 0  # > 0: params hold a bank of that many adapters (`load_bank`)
    apply_fn: Callable[..., Any] | None = None  # models.generate's; None: model.apply


def read_e2e(path: str | Path) -> list[tuple[str, list[str]]]:
    """``[(mr, [ref, ...]), ...]``: every distinct MR in order of first appearance.

    The columns are found by name as training finds them (train/formats.py
    ``find_columns``); others are ignored."""
    path = Path(path).expanduser().resolve()
    table = load_table(str(path))
    found = find_columns(table.column_names, ["mr", "ref"], FORMATS["e2e"].aliases)
    missing = [name for name, column in found.items() if column is None]
    if missing:
        raise DataError(
            f"{path} lacks the column(s) {missing} (it has {table.column_names}); "
            f"an E2E CSV has a header 'mr,ref' and one row per reference"
        )
    table = select_columns(table, found)
    refs: dict[str, list[str]] = {}
    for index, row in enumerate(table.to_list()):
        try:
            refs.setdefault(text_field(row, "mr"), []).append(text_field(row, "ref"))
        except MalformedRow as bad:
            raise DataError(
                f"row {index} of {path} (0-based, header not counted): {bad}; fix or remove the row"
            ) from None
    if not refs:
        raise DataError(f"{path} has no rows")
    return list(refs.items())


def _run_eos_token(adapter_dir: Path) -> str | None:
    """``data.eos_token`` of the run that wrote ``adapter_dir`` (None: the model's own)."""
    for config in (adapter_dir / layout.CONFIG_FILE, adapter_dir.parent / layout.CONFIG_FILE):
        if config.is_file():
            return load_config(config).data.eos_token
    return None


def load_target(target: str | Path) -> Target:
    """The model that CONFIG_OR_RUN_DIR names (see the module docstring)."""
    path = Path(target).expanduser()
    if path.suffix in CONFIG_SUFFIXES:
        cfg = load_config(path)
        model, params, tokenizer = load_model(cfg)
        return Target(model, params, tokenizer, cfg.data.eos_token, f"base model {cfg.model.name}")
    try:
        adapter = adapter_dir(path)
    except AdapterError:  # not a run or adapter directory: a model
        pass
    else:
        adapted = load_adapted(adapter)
        return Target(
            adapted.model,
            adapted.params,
            adapted.tokenizer,
            _run_eos_token(adapter),
            f"{adapted.meta['method']} adapter {adapter.resolve()} on {adapted.meta['model']}",
            apply_fn=decoding_apply(adapted.meta["method"], adapted.model.apply),
        )
    if not path.exists() and str(target) not in models.loaders.EMBEDDED:
        raise FileNotFoundError(
            f"{target} does not exist; pass a YAML run config, a run or "
            f"adapter directory, a Hugging Face checkpoint directory (e.g. "
            f"from lora-jax merge), a .gguf file or one of "
            f"{sorted(models.loaders.EMBEDDED)}"
        )
    model, params, tokenizer = models.load(target)
    if tokenizer is None:
        raise FileNotFoundError(f"{target} has no tokenizer.json; add the base model's")
    return Target(model, params, tokenizer, None, f"model {target}")


def load_bank(targets: list[str | Path]) -> tuple[Target, list[str]]:
    """Several LoRA run or adapter directories of one base as one Target whose params hold
    their bank (``lj.stack``, slot i: ``targets[i]``), and each adapter's description.

    Raises AdapterError (one line) for a directory that is not a LoRA adapter, or whose base
    (model, shapes, fingerprint) is not the first one's."""
    directories = [adapter_dir(t) for t in targets]
    first = load_adapted(directories[0])
    adapted = lj.flatten_paths(lj.adapter(first.params)) if first.meta["method"] == "lora" else {}
    if not adapted:
        raise AdapterError(
            f"{directories[0]} holds a {first.meta['method']} adapter; several adapters decode "
            "together only as LoRA adapters of one base: evaluate it alone"
        )
    base = lj.unflatten_paths(
        {p: v for p, v in lj.flatten_paths(first.params).items() if p not in adapted}
    )
    adapters, descriptions = [], []
    for directory in directories:
        meta = first.meta if directory == directories[0] else read_meta(directory)
        if meta["method"] != "lora" or meta["model"] != first.meta["model"]:
            raise AdapterError(
                f"{directory} holds a {meta['method']} adapter of {meta['model']}; decoding "
                f"together needs LoRA adapters of one base ({first.meta['model']})"
            )
        adapters.append(lj.adapter(load_adapter(directory, base)))  # checks the fingerprint
        descriptions.append(f"lora adapter {directory.resolve()} on {meta['model']}")
    bank = Target(
        first.model,
        lj.combine(base, lj.stack(adapters)),
        first.tokenizer,
        _run_eos_token(directories[0]),
        f"{len(adapters)} LoRA adapters of {first.meta['model']} in one bank",
        slots=len(adapters),
    )
    return bank, descriptions


def decode(target: Target, mrs: list[str], decoding: Decoding, batch_size: int = 8) -> list[str]:
    """One output per MR, decoded in batches (the last one padded by repeating its last MR)."""
    return decode_each(target, mrs, decoding, batch_size)[0]


def decode_each(
    target: Target, mrs: list[str], decoding: Decoding, batch_size: int = 8
) -> list[list[str]]:
    """One output per MR for each adapter of the target's bank (``target.slots``; a target
    without a bank: one list). A batch of `batch_size` MRs decodes as batch_size x slots
    rows, slot-major: row r runs slot ``r // batch_size``."""
    eos_id = data_eos_id(target.eos_token, target.tokenizer, target.model.config.eos_token_id)
    encoded = target.tokenizer.encode_batch(
        [e2e_prompt(mr) for mr in mrs], add_special_tokens=False
    )
    examples = [Example(np.asarray(e.ids, np.int32), len(e.ids)) for e in encoded]
    length = max(e.prompt_length for e in examples)
    context = target.model.config.max_position_embeddings
    if length + decoding.max_new_tokens > context:
        raise DataError(
            f"the longest prompt ({length} tokens) + --max-new-tokens "
            f"{decoding.max_new_tokens} exceeds the model's context of {context} "
            f"tokens; lower --max-new-tokens"
        )
    slots = max(target.slots, 1)
    bank = {"adapter_ids": jnp.repeat(jnp.arange(slots), batch_size)} if target.slots else {}
    outputs = [[] for _ in range(slots)]
    with tqdm(total=len(examples), unit="MR", desc="eval") as bar:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            ids_BxP, mask_BxP = left_padded_prompts(
                (batch + batch[-1:] * (batch_size - len(batch))) * slots, eos_id, length
            )
            new_BxN = np.asarray(
                models.generate(
                    target.model,
                    target.params,
                    ids_BxP,
                    attention_mask=mask_BxP,
                    eos_token_id=eos_id,
                    pad_token_id=eos_id,
                    apply_fn=target.apply_fn,
                    **dataclasses.asdict(decoding),
                    **bank,
                )
            )
            for slot, out in enumerate(outputs):
                rows = new_BxN[slot * batch_size : slot * batch_size + len(batch)]
                out += [" ".join(decode_text(target.tokenizer, r, eos_id).split()) for r in rows]
            bar.update(len(batch))
    return outputs


def report(
    scores: dict[str, float | None], *, description: str, data: str, mrs: int, decoding: Decoding
) -> str:
    """``scores.md``: the scores, on this module's scales and the paper's, and the settings."""

    def cell(value: float | None, factor: float = 1.0) -> str:
        return "null" if value is None else f"{value * factor:.4f}"

    lines = [
        "# E2E evaluation",
        "",
        f"- model: {description}",
        f"- data: {data} ({mrs} MRs)",
        f"- decoding: {json.dumps(dataclasses.asdict(decoding))}",
        "- implementations: studies/e2e/metrics.py",
        "",
        "| metric | score | LoRA paper's scale |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {cell(scores[name])} | {cell(scores[name], e2e_metrics.PAPER_SCALE[name])} |"
        for name in e2e_metrics.METRICS
    ]
    notes = e2e_metrics.notes(scores)
    return "\n".join(lines + ([""] + [f"Note: {n}" for n in notes] if notes else [])) + "\n"


def write_outputs(
    out: str | Path, predictions: list[str], scores: dict[str, float | None], markdown: str
) -> Path:
    """``predictions.txt``, ``scores.json`` and ``scores.md`` in ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / PREDICTIONS_FILE).write_text("".join(p + "\n" for p in predictions))
    (out / SCORES_FILE).write_text(json.dumps(scores, indent=1) + "\n")
    (out / REPORT_FILE).write_text(markdown)
    return out


def run_command(args: argparse.Namespace) -> int:
    """``lora-jax eval`` (arguments: studies/e2e/commands.py)."""
    for name in ("num_beams", "limit", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DataError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.out:  # before the slow work: a foreign non-empty directory is refused
        rundir.claim(args.out, layout.Kind.EVAL)
    groups = read_e2e(args.data)[: args.limit]
    print(f"decoding {len(groups)} MRs of {args.data} with {', '.join(map(str, args.targets))}")
    decoding = dataclasses.replace(
        PAPER_DECODING,
        num_beams=1 if args.greedy else args.num_beams,
        max_new_tokens=args.max_new_tokens,
    )
    if len(args.targets) == 1:
        target = load_target(args.targets[0])
        descriptions, outs = [target.description], [args.out]
        predictions = [decode(target, [mr for mr, _ in groups], decoding, args.batch_size)]
    else:
        target, descriptions = load_bank(args.targets)
        names = [f"{i}-{adapter_dir(t).resolve().parent.name}" for i, t in enumerate(args.targets)]
        outs = [args.out and Path(args.out) / name for name in names]
        predictions = decode_each(target, [mr for mr, _ in groups], decoding, args.batch_size)
    for description, out, outputs in zip(descriptions, outs, predictions, strict=True):
        scores = e2e_metrics.score(outputs, [refs for _, refs in groups])
        markdown = report(
            scores, description=description, data=args.data, mrs=len(groups), decoding=decoding
        )
        print(markdown)
        if out:
            print(f"written: {write_outputs(out, outputs, scores, markdown)}")
    return 0
