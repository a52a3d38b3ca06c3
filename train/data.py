"""The data pipeline: a table -> tokenised train/validation examples -> batches.

:func:`build_splits` loads ``data.path`` through Hugging Face ``datasets`` (a local
``.csv``/``.json``/``.jsonl``/``.parquet`` file, chosen by extension, or a hub data set
name), formats each row into (prompt, target) with the task's formatter
(``train/formats.py``), tokenises it (``train/examples.py``) and splits the examples
by the grouping key (E2E: ``mr``), so no group is on both sides.

Rows are never dropped silently: a malformed row (missing, null, non-string or empty
field; a prompt with no room for a target) is skipped and counted under its reason in
:attr:`DataReport.skipped` (``data.on_malformed=skip``) or raises an error naming the
row (``error``); an example longer than ``data.max_length`` is truncated and counted
(``data.on_too_long=truncate``), skipped and counted (``skip``) or an error (``error``).

:func:`train_batches` and :func:`validation_batches` turn the splits into fixed-shape
batches (``train/batching.py`` documents the arrays and the next-token convention).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import datasets
from tokenizers import Tokenizer

from train.batching import START, Batch, DataPosition, TrainBatches, eval_batches
from train.config import REPO_ROOT, DataConfig, resolve_path
from train.examples import Example, encode_pairs, fit_example, length_status
from train.formats import FORMATS, MalformedRow, find_columns, is_missing
from train.ordering import split_by_group

LOCAL_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Data that cannot be used; the message names the file or row and the fix."""


@dataclass(frozen=True)
class DataReport:
    """What happened to the rows of the table."""

    rows: int  # rows read
    skipped: dict[str, int]  # reason -> rows skipped (malformed, or too long with on_too_long=skip)
    truncated: int  # examples kept with the end of their target cut
    train_examples: int
    validation_examples: int
    train_groups: int
    validation_groups: int

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return (f"{self.rows} rows: {sum(self.skipped.values())} skipped ({skipped or 'none'}), "
                f"{self.truncated} truncated; train {self.train_examples} examples in "
                f"{self.train_groups} groups, validation {self.validation_examples} examples in "
                f"{self.validation_groups} groups")


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    pad_id: int  # the EOS id; padding is masked out everywhere
    report: DataReport


def load_table(path: str, source_split: str = "train") -> datasets.Dataset:
    """The rows at ``path``: a local file (relative to the repository root) or a hub data set.

    ``source_split`` picks the split of a hub data set; a local file is one split.
    """
    local = resolve_path(path)
    builder = LOCAL_BUILDERS.get(local.suffix.lower())
    if builder is None and local.exists():
        raise DataError(f"data file {local} has an unsupported extension; use one of "
                        f"{sorted(LOCAL_BUILDERS)}")
    if builder is not None:
        if not local.is_file():
            raise DataError(f"data file {local} does not exist (data.path={path!r}; relative paths "
                            f"are resolved against the repository root {REPO_ROOT}); pass "
                            f"data.path=/path/to/file{local.suffix}")
        try:
            return datasets.load_dataset(builder, data_files=str(local), split="train")
        except ValueError as e:  # e.g. 'Instruction "train" corresponds to no data!'
            raise DataError(f"could not read data file {local} as {builder}: {e}; is it empty, "
                            f"or not {builder}?") from e
    try:
        return datasets.load_dataset(path, split=source_split)
    except Exception as e:  # no network, unknown name, missing split: all end here
        raise DataError(f"could not load data set {path!r} (split {source_split!r}) from the hub: "
                        f"{e}; for a local file give a path ending in one of "
                        f"{sorted(LOCAL_BUILDERS)}") from e


def select_columns(table: datasets.Dataset, found: Mapping[str, str]) -> datasets.Dataset:
    """The columns ``found`` names (ours -> the table's, train/formats.py ``find_columns``),
    under our names."""
    return table.select_columns(list(found.values())).rename_columns(
        {column: name for name, column in found.items() if column != name})


def _group(row: Mapping[str, Any], key: str | None, index: int) -> str:
    """The row's grouping value as a string; the row index when there is no key."""
    if key is None:
        return str(index)
    if is_missing(row.get(key)):
        raise MalformedRow("missing", f"grouping column '{key}' is missing (null/NaN)")
    return str(row[key])


def _row_name(cfg: DataConfig, index: int) -> str:
    return f"row {index} of {cfg.path!r} (0-based, header not counted)"


def _format_rows(table: datasets.Dataset, cfg: DataConfig,
                 skipped: Counter) -> list[tuple[int, str, str, str]]:
    """``[(row index, prompt, target, group), ...]`` for the well-formed rows; counts the rest."""
    fmt = FORMATS[cfg.format]
    split_key = cfg.split_key or fmt.split_key
    needed = list(dict.fromkeys(fmt.columns + ((split_key,) if split_key else ())))
    found = find_columns(table.column_names, needed)
    missing = [name for name, column in found.items() if column is None]
    if missing:
        raise DataError(f"data {cfg.path!r} lacks columns {missing} (it has {table.column_names}); "
                        f"data.format={cfg.format!r} needs {list(fmt.columns)}"
                        + (f" and data.split_key={split_key!r}" if split_key else "")
                        + "; rename the columns or set data.format / data.split_key")
    formatted = []
    for index, row in enumerate(select_columns(table, found).to_list()):
        try:
            formatted.append((index, *fmt.build(row), _group(row, split_key, index)))
        except MalformedRow as bad:
            _refuse(cfg.on_malformed, f"{_row_name(cfg, index)}: {bad}; fix the row or set "
                                      f"data.on_malformed=skip")
            skipped[bad.reason] += 1
    return formatted


def _fit_lengths(formatted: list[tuple[int, str, str, str]],
                 pairs: list[tuple[list[int], list[int]]], cfg: DataConfig,
                 skipped: Counter) -> tuple[list[Example], list[str], int]:
    """(examples, their groups, truncated count) after the ``max_length`` rules; counts skips."""
    examples, groups, truncated = [], [], 0
    for (index, _, _, group), (prompt_ids, target_ids) in zip(formatted, pairs, strict=True):
        status = length_status(len(prompt_ids), len(target_ids), cfg.max_length)
        if status == "prompt_too_long":
            _refuse(cfg.on_malformed, f"{_row_name(cfg, index)}: the prompt has {len(prompt_ids)} "
                                      f"tokens, leaving no room for a target in data.max_length="
                                      f"{cfg.max_length}; raise data.max_length or set "
                                      f"data.on_malformed=skip")
            skipped[status] += 1
            continue
        if status == "too_long":
            _refuse(cfg.on_too_long, f"{_row_name(cfg, index)}: prompt + target + EOS is "
                                     f"{len(prompt_ids) + len(target_ids)} tokens, more than "
                                     f"data.max_length={cfg.max_length}; raise data.max_length or "
                                     f"set data.on_too_long=truncate|skip")
            if cfg.on_too_long == "skip":
                skipped[status] += 1
                continue
            truncated += 1
        examples.append(fit_example(prompt_ids, target_ids, cfg.max_length))
        groups.append(group)
    return examples, groups, truncated


def _refuse(policy: str, message: str) -> None:
    """Raise DataError(message) when the policy is ``'error'``; otherwise the caller counts."""
    if policy == "error":
        raise DataError(message)


def build_splits(cfg: DataConfig, tokenizer: Tokenizer, seed: int) -> Splits:
    """Load, format, tokenise and split the data set described by ``cfg``."""
    eos_id = tokenizer.token_to_id(cfg.eos_token)
    if eos_id is None:
        raise DataError(f"the tokenizer has no token {cfg.eos_token!r} (data.eos_token); set "
                        f"data.eos_token to its end-of-sequence token")
    table = load_table(cfg.path, cfg.source_split)
    if len(table) == 0:
        raise DataError(f"data {cfg.path!r} has no rows")
    skipped: Counter = Counter()
    formatted = _format_rows(table, cfg, skipped)
    pairs = encode_pairs(tokenizer, [f[1] for f in formatted], [f[2] for f in formatted], eos_id)
    examples, groups, truncated = _fit_lengths(formatted, pairs, cfg, skipped)
    if not examples:
        raise DataError(f"all {len(table)} rows of {cfg.path!r} were skipped ({dict(skipped)}); "
                        f"see data.on_malformed / data.on_too_long and data.max_length")
    train_idx, val_idx = split_by_group(groups, cfg.validation_fraction, seed)
    if cfg.validation_fraction > 0 and len(val_idx) == 0:
        raise DataError(f"data {cfg.path!r} has a single group, so none can be held out for "
                        f"validation; set data.validation_fraction=0 or data.split_key")
    report = DataReport(rows=len(table), skipped=dict(skipped), truncated=truncated,
                        train_examples=len(train_idx), validation_examples=len(val_idx),
                        train_groups=len({groups[i] for i in train_idx}),
                        validation_groups=len({groups[i] for i in val_idx}))
    return Splits([examples[i] for i in train_idx], [examples[i] for i in val_idx], eos_id, report)


def train_batches(splits: Splits, cfg: DataConfig, *, seed: int, process_index: int = 0,
                  process_count: int = 1,
                  position: DataPosition = START) -> TrainBatches:
    """The resumable training stream of ``[batch_size // process_count, max_length]`` batches."""
    return TrainBatches(splits.train, batch_size=cfg.batch_size, max_length=cfg.max_length,
                        pad_id=splits.pad_id, packing=cfg.packing, seed=seed,
                        process_index=process_index, process_count=process_count,
                        position=position)


def validation_batches(splits: Splits, cfg: DataConfig, *, process_index: int = 0,
                       process_count: int = 1, num_batches: int | None = None) -> Iterator[Batch]:
    """Validation batches in a fixed order, every example once (see ``eval_batches``)."""
    return eval_batches(splits.validation, batch_size=cfg.batch_size, max_length=cfg.max_length,
                        pad_id=splits.pad_id, process_index=process_index,
                        process_count=process_count, num_batches=num_batches)
