"""The data pipeline: a table -> tokenised train/validation examples -> batches.

:func:`build_splits` loads ``data.path`` (:func:`load_table`: a local ``.csv``,
``.json``/``.jsonl`` or ``.parquet`` file, chosen by extension, or a hub data set name),
formats each row into (prompt, target) with the task's formatter (``train/formats.py``),
tokenises it (``train/examples.py``) and splits the examples by the grouping key (E2E:
``mr``), so no group is on both sides.

Local CSV and JSON files are read here, not by ``datasets``, so that a bad line is named
by its file and line number (:func:`read_csv`, :func:`read_json`). CSV is read strictly
(Python's ``csv`` module, ``strict=True``) as UTF-8 text: every value is a string, an
empty cell is missing, and ``NA``/``None``/``null`` are text like any other (pandas,
which ``datasets`` used, made them missing and made numeric columns numbers).

Rows are never dropped silently: a malformed row is skipped and counted under its reason
in :attr:`DataReport.skipped` (``data.on_malformed=skip``) or raises an error naming the
row (``error``). Malformed are: a CSV row with more fields than the header
(``extra_fields``), a quote that closes a field and is followed by more text
(``bad_quote``), a line that is not UTF-8 (``not_utf8``), a JSON Lines line that is not
JSON (``bad_json``) or not an object (``not_object``), a missing, null, non-string or
empty field, a prompt with no room for a target (``prompt_too_long``). A file that cannot
be read at all is always an error: a missing or unreadable file, an empty one, a bad
header, a quote that is never closed (it would swallow the rest of the file). An example
longer than ``data.max_length`` is truncated and counted (``data.on_too_long=truncate``),
skipped and counted (``skip``) or an error (``error``); a prompt or target text far too
long for ``data.max_length`` tokens is first cut by characters
(``train/examples.py`` :func:`~train.examples.char_limit`) and counted in
:attr:`DataReport.cut`, so the tokenizer never sees a 10 MB field.

:func:`train_batches` and :func:`validation_batches` turn the splits into fixed-shape
batches (``train/batching.py`` documents the arrays and the next-token convention).
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import datasets
from tokenizers import Tokenizer

from train.batching import START, Batch, DataPosition, TrainBatches, eval_batches
from train.config import DataConfig, resolve_path
from train.errors import UserError
from train.examples import Example, char_limit, encode_pairs, fit_example, length_status
from train.formats import FORMATS, MalformedRow, find_columns, is_missing
from train.ordering import split_by_group

_ONE_OBJECT_A_LINE = 'each line must hold one JSON object, e.g. {"mr": "...", "ref": "..."}'
LOCAL_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_LONE_CR = re.compile(r"(?<=\r)(?!\n)")  # the end of a line ended by \r alone
CSV_FIELD_LIMIT = 2**31 - 1  # csv's default is 131072 characters; sys.maxsize overflows a C long


class DataError(UserError, ValueError):
    """Data that cannot be used; the message names the file or row and the fix."""


@dataclass(frozen=True)
class DataReport:
    """What happened to the rows of the table."""

    rows: int  # rows read (those skipped while reading the file included)
    skipped: dict[str, int]  # reason -> rows skipped (malformed, or too long with on_too_long=skip)
    truncated: int  # examples kept with the end of their target cut
    train_examples: int
    validation_examples: int
    train_groups: int
    validation_groups: int
    cut: int = 0  # rows whose prompt or target text was cut by characters before tokenising

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        cut = (
            f" ({self.cut} with a text far longer than data.max_length cut before tokenising)"
            if self.cut
            else ""
        )
        return (
            f"{self.rows} rows: {sum(self.skipped.values())} skipped ({skipped or 'none'}), "
            f"{self.truncated} truncated{cut}; train {self.train_examples} examples in "
            f"{self.train_groups} groups, validation {self.validation_examples} examples in "
            f"{self.validation_groups} groups"
        )


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    pad_id: int  # the EOS id; padding is masked out everywhere
    report: DataReport


@dataclass
class Table:
    """The rows of a local CSV or JSON file, as :func:`read_csv` / :func:`read_json` read them.

    Used like the ``datasets.Dataset`` that :func:`load_table` returns for other sources:
    ``column_names``, ``len()``, ``to_list()`` and :func:`select_columns`.
    """

    file: Path
    column_names: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)  # a column a row lacks is missing
    lines: list[int | None] = field(default_factory=list)  # each row's first line (None: in
    # a JSON array)
    skipped: Counter = field(default_factory=Counter)  # reason -> rows dropped while reading

    def __len__(self) -> int:
        return len(self.rows)

    def to_list(self) -> list[dict[str, Any]]:
        """Every row as ``{column: value}`` over all the columns (None where it has none)."""
        return [{column: row.get(column) for column in self.column_names} for row in self.rows]

    def add(self, row: dict[str, Any], line: int | None) -> None:
        self.rows.append(row)
        self.lines.append(line)

    def malformed(self, policy: str | None, reason: str, message: str) -> None:
        """Count the row under ``reason`` (policy ``'skip'``) or raise DataError(message and
        the fix): ``'error'`` is ``data.on_malformed=error``, None an error with no such key."""
        _refuse(
            policy or "error",
            f"{message}; fix the file" + (" or set data.on_malformed=skip" if policy else ""),
        )
        self.skipped[reason] += 1


def check_source(cfg: DataConfig) -> None:
    """Raise DataError unless ``data.path`` is set and, when it names a local file (a known
    extension), that file exists: found before a model is loaded, not after."""
    if cfg.path is None:
        raise DataError(
            "data.path is not set; give the training data, e.g. data.path=/path/to/train.csv "
            f"(a local {', '.join(sorted(LOCAL_BUILDERS))} file, or a hub data set name)"
        )
    local = resolve_path(cfg.path)
    if local.suffix.lower() in LOCAL_BUILDERS and not local.exists():
        raise _missing_file(local, cfg.path)


def _missing_file(local: Path, path: str) -> DataError:
    return DataError(
        f"data file {local} does not exist (data.path={path!r}; relative paths "
        f"are resolved against the current directory {Path.cwd()}); pass "
        f"data.path=/path/to/file{local.suffix}"
    )


def load_table(
    path: str, source_split: str = "train", on_malformed: str | None = None
) -> Table | datasets.Dataset:
    """The rows at ``path``: a local file (relative to the current directory) or a hub data set.

    ``source_split`` picks the split of a hub data set; a local file is one split. A local
    ``.csv``/``.json``/``.jsonl`` file is a :class:`Table` whose malformed lines are skipped
    and counted in ``Table.skipped`` (``on_malformed='skip'``) or raise a DataError naming
    the file and line (``'error'``, which names ``data.on_malformed`` as a way out; None,
    which does not); ``.parquet`` and hub data come through ``datasets``.
    """
    local = resolve_path(path)
    builder = LOCAL_BUILDERS.get(local.suffix.lower())
    if builder is None and local.exists():
        raise DataError(
            f"data file {local} has an unsupported extension; use one of {sorted(LOCAL_BUILDERS)}"
        )
    if builder is not None:
        if local.is_dir():
            raise DataError(
                f"data file {local} is a directory, not a file (data.path={path!r}); "
                f"pass data.path=/path/to/file{local.suffix}"
            )
        if not local.is_file():
            raise _missing_file(local, path)
        if builder == "csv":
            return read_csv(local, on_malformed)
        if builder == "json":
            return read_json(local, on_malformed)
        try:
            with _quiet_datasets():
                return datasets.load_dataset(builder, data_files=str(local), split="train")
        except Exception as e:  # noqa: BLE001 - pyarrow, datasets and OS errors all end here
            raise DataError(
                f"could not read data file {local} as {builder}: {_reason(e)}; is it "
                f"empty, or not {builder}?"
            ) from e
    try:
        with _quiet_datasets():
            return datasets.load_dataset(path, split=source_split)
    except Exception as e:  # no network, unknown name, missing split: all end here
        raise DataError(
            f"could not load data set {path!r} (split {source_split!r}) from the hub: "
            f"{' '.join(str(e).split())}; for a local file give a path ending in "
            f"one of {sorted(LOCAL_BUILDERS)}"
        ) from e


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """``datasets`` logs a parser's failure before raising it; the DataError says it once."""
    saved = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(saved)


def _reason(e: BaseException) -> str:
    """The innermost cause of ``e`` on one line (``datasets`` wraps the parser's error)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- local files


@contextlib.contextmanager
def _open(local: Path) -> Iterator[BinaryIO]:
    """``local`` opened for reading bytes; a DataError naming it when it cannot be."""
    try:
        handle = local.open("rb")
    except OSError as e:
        raise DataError(
            f"cannot read data file {local}: {e.strerror or e}; check that it is a "
            f"file you may read"
        ) from None
    with handle:
        head = handle.read(2)
        if head in (b"\xff\xfe", b"\xfe\xff"):
            raise DataError(f"data file {local} is UTF-16 text; re-save it as UTF-8")
        handle.seek(0)
        yield handle


class _Lines:
    """The lines of a binary file as UTF-8 text, numbered from 1, ending at LF, CR LF or a
    lone CR (old Mac files), with a leading byte-order mark dropped. An undecodable
    line is decoded with replacement characters and remembered, so the row it belongs to can
    be skipped or named."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.number = 0  # lines read so far
        self.undecodable: dict[int, UnicodeDecodeError] = {}
        self.exhausted = False
        self._pending: list[tuple[str, UnicodeDecodeError | None]] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if not self._pending:
            raw = self.handle.readline()
            if not raw:
                self.exhausted = True
                raise StopIteration
            error = None
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                error, text = e, raw.decode("utf-8", errors="replace")
            if self.number == 0:
                text = text.removeprefix("\ufeff")
            pieces = _LONE_CR.split(text) if "\r" in text else [text]
            self._pending = [(piece, error) for piece in reversed(pieces) if piece]
        text, error = self._pending.pop()
        self.number += 1
        if error is not None:
            self.undecodable[self.number] = error
        return text

    def not_utf8(self, first: int, last: int) -> str | None:
        """What is wrong with the first undecodable line in ``first..last``, or None."""
        for number in range(first, last + 1):
            e = self.undecodable.get(number)
            if e is not None:
                return (
                    f"line {number} is not UTF-8 text (byte {e.object[e.start : e.end]!r} at "
                    f"byte {e.start + 1} of the line); re-save the file as UTF-8"
                )
        return None


@contextlib.contextmanager
def _csv_field_limit() -> Iterator[None]:
    """No limit on the characters of a CSV field while inside (long ones are cut later)."""
    saved = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        yield
    finally:
        csv.field_size_limit(saved)


def read_csv(local: Path, on_malformed: str | None = None) -> Table:
    """The rows of a CSV file with a header line; values are strings, an empty cell None.

    Blank lines are ignored; a row with fewer fields than the header lacks the rest (they
    are missing). A row with more fields (``extra_fields``), a quote followed by text other
    than a delimiter (``bad_quote``) or bytes that are not UTF-8 (``not_utf8``) is skipped
    and counted (``on_malformed='skip'``) or a DataError naming the line (otherwise). An
    empty file, a bad header and a quote never closed are DataErrors whatever the policy.
    """
    with _open(local) as handle, _csv_field_limit():
        lines = _Lines(handle)
        reader = csv.reader(lines, strict=True)
        table = Table(local, _csv_header(reader, lines, local))
        width = len(table.column_names)
        while True:
            first = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                where = f"data file {local}, line {first}"
                if lines.exhausted:
                    raise DataError(
                        f"{where}: a quoted field in the row starting here is never "
                        f"closed, so the rest of the file (lines {first}-"
                        f"{lines.number}) would be one field; close the quote, and "
                        f'write a quote inside a quoted field as two ("")'
                    ) from None
                last = reader.line_num
                table.malformed(
                    on_malformed,
                    "bad_quote",
                    f"{where}{f'-{last}' if last > first else ''}: {e} (a quote "
                    f"inside a field must be doubled and the field quoted, "
                    f'e.g. "say ""hi""")',
                )
                continue
            if not fields:  # a blank line
                continue
            where = f"data file {local}, line {first}"
            bad_text = lines.not_utf8(first, reader.line_num)
            if bad_text is not None:
                table.malformed(on_malformed, "not_utf8", f"data file {local}: {bad_text}")
                continue
            if len(fields) > width:
                table.malformed(
                    on_malformed,
                    "extra_fields",
                    f"{where}: the row has {len(fields)} fields but the header has "
                    f"{width} ({','.join(table.column_names)}); quote a field that "
                    f"holds a comma, or remove the extra field",
                )
                continue
            table.add(
                {
                    name: value if value != "" else None
                    for name, value in zip(table.column_names, fields)
                },
                first,
            )
    return table


def _csv_header(reader: Any, lines: _Lines, local: Path) -> list[str]:
    """The column names of the first non-blank line; unnamed and repeated ones renamed as
    pandas does (``Unnamed: 2``, ``ref.1``)."""
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            raise DataError(
                f"data file {local} is empty: a CSV needs a header line naming its "
                f"columns (e.g. mr,ref) and then one row per example"
            ) from None
        except csv.Error as e:
            raise DataError(
                f"data file {local}, line {lines.number}: the header line is not "
                f"valid CSV ({e}); the first line must name the columns, e.g. "
                f"mr,ref"
            ) from None
        if fields:
            break
    bad_text = lines.not_utf8(1, reader.line_num)
    if bad_text is not None:
        raise DataError(f"data file {local}: the header: {bad_text}")
    names: list[str] = []
    for i, name in enumerate(fields):
        name = name or f"Unnamed: {i}"
        base, n = name, 0
        while name in names:
            n += 1
            name = f"{base}.{n}"
        names.append(name)
    return names


def read_json(local: Path, on_malformed: str | None = None) -> Table:
    """The records of a JSON file: an array of objects, or JSON Lines (one object a line,
    blank lines ignored). A line that is not JSON (``bad_json``), not an object
    (``not_object``) or not UTF-8 (``not_utf8``) is skipped and counted or a DataError
    naming the line; a broken array is a DataError naming its line and column."""
    with _open(local) as handle:
        start = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        handle.seek(0)
        if start == b"[":
            return _read_json_array(local, handle.read(), on_malformed)
        lines = _Lines(handle)
        table, columns = Table(local, []), {}
        for text in lines:
            number = lines.number
            if not text.strip():
                continue
            where = f"data file {local}, line {number}"
            bad_text = lines.not_utf8(number, number)
            if bad_text is not None:
                table.malformed(on_malformed, "not_utf8", f"data file {local}: {bad_text}")
                continue
            try:
                record = json.loads(text.rstrip())
            except json.JSONDecodeError as e:
                table.malformed(
                    on_malformed,
                    "bad_json",
                    f"{where}: not valid JSON ({e.msg}: column {e.colno}); {_ONE_OBJECT_A_LINE}",
                )
                continue
            if not isinstance(record, dict):
                table.malformed(
                    on_malformed,
                    "not_object",
                    f"{where}: a JSON {type(record).__name__}, not an object; {_ONE_OBJECT_A_LINE}",
                )
                continue
            columns.update(dict.fromkeys(record))
            table.add(record, number)
        table.column_names = list(columns)
    return table


def _read_json_array(local: Path, data: bytes, on_malformed: str | None) -> Table:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"data file {local}, line {line}: not UTF-8 text (byte "
            f"{e.object[e.start : e.end]!r}); re-save the file as UTF-8"
        ) from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"data file {local}, line {e.lineno}: not valid JSON ({e.msg}: column "
            f"{e.colno}); the file must hold one array of objects, or one object "
            f"a line (JSON Lines)"
        ) from None
    table, columns = Table(local, []), {}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            table.malformed(
                on_malformed,
                "not_object",
                f"data file {local}, element {index} of the array: a JSON "
                f"{type(record).__name__}, not an object",
            )
            continue
        columns.update(dict.fromkeys(record))
        table.add(record, None)
    table.column_names = list(columns)
    return table


# --------------------------------------------------------------------------- rows -> examples


def select_columns(
    table: Table | datasets.Dataset, found: Mapping[str, str]
) -> Table | datasets.Dataset:
    """The columns ``found`` names (ours -> the table's, train/formats.py ``find_columns``),
    under our names."""
    if isinstance(table, Table):
        return Table(
            table.file,
            list(found),
            [{name: row.get(column) for name, column in found.items()} for row in table.rows],
            table.lines,
            table.skipped,
        )
    return table.select_columns(list(found.values())).rename_columns(
        {column: name for name, column in found.items() if column != name}
    )


class _Row(NamedTuple):
    """A well-formed row, formatted; its texts cut to the character limit."""

    index: int  # among the rows read
    line: int | None  # where it starts in the file, when known
    prompt: str
    target: str
    group: str
    cut: bool  # the prompt or the target was cut


def _group(row: Mapping[str, Any], key: str | None, index: int) -> str:
    """The row's grouping value as a string; the row index when there is no key."""
    if key is None:
        return str(index)
    if is_missing(row.get(key)):
        raise MalformedRow("missing", f"grouping column '{key}' is missing (null/NaN)")
    return str(row[key])


def _row_name(cfg: DataConfig, index: int, line: int | None) -> str:
    if line is None:
        return f"row {index} of {cfg.path!r} (0-based, header not counted)"
    return f"row {index} of {cfg.path!r} (line {line} of the file)"


def _source(table: Table | datasets.Dataset, cfg: DataConfig) -> str:
    return f"data file {table.file}" if isinstance(table, Table) else f"data {cfg.path!r}"


def _needs(cfg: DataConfig, split_key: str | None) -> str:
    """What the format reads, for messages: its columns, their other names, the split key."""
    fmt = FORMATS[cfg.format]
    aliases = [
        f"{name} (or {' / '.join(fmt.aliases[name])})" if name in fmt.aliases else name
        for name in fmt.columns
    ]
    key = f" and data.split_key={split_key!r}" if split_key and split_key not in fmt.columns else ""
    return f"data.format={cfg.format!r} needs the columns [{', '.join(aliases)}]{key} (any case)"


def _format_rows(
    table: Table | datasets.Dataset, cfg: DataConfig, skipped: Counter, limit: int
) -> list[_Row]:
    """The well-formed rows, formatted, each text cut to ``limit`` characters; counts the rest."""
    fmt = FORMATS[cfg.format]
    split_key = cfg.split_key or fmt.split_key
    needed = list(dict.fromkeys(fmt.columns + ((split_key,) if split_key else ())))
    found = find_columns(table.column_names, needed, fmt.aliases)
    missing = [name for name, column in found.items() if column is None]
    if missing:
        raise DataError(
            f"{_source(table, cfg)} lacks columns {missing} (it has "
            f"{table.column_names}); {_needs(cfg, split_key)}; rename the columns "
            f"or set data.format / data.split_key"
        )
    lines = table.lines if isinstance(table, Table) else None
    formatted = []
    for index, row in enumerate(select_columns(table, found).to_list()):
        line = None if lines is None else lines[index]
        try:
            prompt, target = fmt.build(row)
            group = _group(row, split_key, index)
        except MalformedRow as bad:
            _refuse(
                cfg.on_malformed,
                f"{_row_name(cfg, index, line)}: {bad}; fix the row or set data.on_malformed=skip",
            )
            skipped[bad.reason] += 1
            continue
        cut = len(prompt) > limit or len(target) > limit
        formatted.append(_Row(index, line, prompt[:limit], target[:limit], group, cut))
    return formatted


def _fit_lengths(
    formatted: list[_Row],
    pairs: list[tuple[list[int], list[int]]],
    cfg: DataConfig,
    skipped: Counter,
) -> tuple[list[Example], list[str], int]:
    """(examples, their groups, truncated count) after the ``max_length`` rules; counts skips."""
    examples, groups, truncated = [], [], 0
    for row, (prompt_ids, target_ids) in zip(formatted, pairs, strict=True):
        status = length_status(len(prompt_ids), len(target_ids), cfg.max_length)
        at_least = "at least " if row.cut else ""  # a cut text had more tokens than counted
        if status == "prompt_too_long":
            _refuse(
                cfg.on_malformed,
                f"{_row_name(cfg, row.index, row.line)}: the prompt has "
                f"{at_least}{len(prompt_ids)} tokens, leaving no room for "
                f"a target in data.max_length={cfg.max_length}; raise "
                f"data.max_length or set data.on_malformed=skip",
            )
            skipped[status] += 1
            continue
        if status == "too_long":
            _refuse(
                cfg.on_too_long,
                f"{_row_name(cfg, row.index, row.line)}: prompt + target + "
                f"EOS is {at_least}{len(prompt_ids) + len(target_ids)} "
                f"tokens, more than data.max_length={cfg.max_length}; raise "
                f"data.max_length or set data.on_too_long=truncate|skip",
            )
            if cfg.on_too_long == "skip":
                skipped[status] += 1
                continue
            truncated += 1
        examples.append(fit_example(prompt_ids, target_ids, cfg.max_length))
        groups.append(row.group)
    return examples, groups, truncated


def _refuse(policy: str, message: str) -> None:
    """Raise DataError(message) when the policy is ``'error'``; otherwise the caller counts."""
    if policy == "error":
        raise DataError(message)


def _no_rows(table: Table | datasets.Dataset, cfg: DataConfig) -> DataError:
    fmt = FORMATS[cfg.format]
    needs = _needs(cfg, cfg.split_key or fmt.split_key)
    if not isinstance(table, Table):
        return DataError(f"data {cfg.path!r} has no rows; {needs}, one example per row")
    if table.file.suffix.lower() == ".csv":
        return DataError(
            f"could not read data file {table.file}: it has a header line "
            f"({','.join(table.column_names)}) but no rows; {needs}, one example "
            f"per row"
        )
    return DataError(
        f"could not read data file {table.file}: it holds no JSON records; {needs}, "
        f"one object per line"
    )


def _all_skipped(cfg: DataConfig, rows: int, skipped: Counter) -> DataError:
    return DataError(
        f"all {rows} rows of {cfg.path!r} were skipped ({dict(skipped)}); see "
        f"data.on_malformed / data.on_too_long and data.max_length"
    )


def eos_id(eos_token: str | None, tokenizer: Tokenizer, model_eos_id: int | None) -> int:
    """The id of ``eos_token`` (``data.eos_token``), or the model's EOS id when it is None."""
    if eos_token is None:
        if model_eos_id is None:
            raise DataError(
                "the model's config names no EOS token (eos_token_id); set data.eos_token to "
                "the token that ends a target, e.g. data.eos_token='<|im_end|>'"
            )
        return model_eos_id
    found = tokenizer.token_to_id(eos_token)
    if found is None:
        raise DataError(
            f"the tokenizer has no token {eos_token!r} (data.eos_token); set "
            f"data.eos_token to its end-of-sequence token"
        )
    return found


def build_splits(
    cfg: DataConfig, tokenizer: Tokenizer, seed: int, model_eos_id: int | None = None
) -> Splits:
    """Load, format, tokenise and split the data set described by ``cfg``; targets end with
    ``data.eos_token``, else the model's EOS (``model_eos_id``)."""
    eos = eos_id(cfg.eos_token, tokenizer, model_eos_id)
    check_source(cfg)
    table = load_table(cfg.path, cfg.source_split, cfg.on_malformed)
    skipped: Counter = Counter(table.skipped if isinstance(table, Table) else {})
    rows = len(table) + sum(skipped.values())
    if len(table) == 0:
        raise _all_skipped(cfg, rows, skipped) if skipped else _no_rows(table, cfg)
    formatted = _format_rows(table, cfg, skipped, char_limit(tokenizer, cfg.max_length))
    del table  # its rows may hold long texts that are only needed cut
    pairs = encode_pairs(
        tokenizer, [r.prompt for r in formatted], [r.target for r in formatted], eos
    )
    examples, groups, truncated = _fit_lengths(formatted, pairs, cfg, skipped)
    if not examples:
        raise _all_skipped(cfg, rows, skipped)
    train_idx, val_idx = split_by_group(groups, cfg.validation_fraction, seed)
    if cfg.validation_fraction > 0 and len(val_idx) == 0:
        raise DataError(
            f"data {cfg.path!r} has a single group, so none can be held out for "
            f"validation; set data.validation_fraction=0 or data.split_key"
        )
    report = DataReport(
        rows=rows,
        skipped=dict(skipped),
        truncated=truncated,
        train_examples=len(train_idx),
        validation_examples=len(val_idx),
        train_groups=len({groups[i] for i in train_idx}),
        validation_groups=len({groups[i] for i in val_idx}),
        cut=sum(r.cut for r in formatted),
    )
    return Splits([examples[i] for i in train_idx], [examples[i] for i in val_idx], eos, report)


def train_batches(
    splits: Splits,
    cfg: DataConfig,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    position: DataPosition = START,
) -> TrainBatches:
    """The resumable training stream of ``[batch_size // process_count, max_length]`` batches."""
    return TrainBatches(
        splits.train,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        pad_id=splits.pad_id,
        packing=cfg.packing,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        position=position,
    )


def validation_batches(
    splits: Splits,
    cfg: DataConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_batches: int | None = None,
) -> Iterator[Batch]:
    """Validation batches in a fixed order, every example once (see ``eval_batches``)."""
    return eval_batches(
        splits.validation,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        pad_id=splits.pad_id,
        process_index=process_index,
        process_count=process_count,
        num_batches=num_batches,
    )
