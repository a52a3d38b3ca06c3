"""Fixed-shape batches from tokenised examples: padding, packing, per-process shards.

A batch is a dict of int32 numpy arrays, all ``[b, L]`` with ``L = max_length`` and
``b = batch_size // process_count`` rows (this process's share of the global batch):

``input_ids``
    token ids; padding is ``pad_id``.
``segment_ids``
    1, 2, ... for the examples packed into a row (always 1 without packing), 0 on
    padding. Attention from query q to key k is allowed iff
    ``segment_ids[q] == segment_ids[k] != 0`` and ``k <= q``, so it never crosses an
    example boundary; ``segment_ids > 0`` is the padding (attention) mask.
``positions``
    position of each token within its own example (restarts at 0 per segment).
``loss_mask``
    1 where the token is a *target* token, 0 on prompt tokens and padding.

Next-token convention: ``loss_mask`` is aligned with ``input_ids``; the prediction of
token t is made at position t - 1, so the loss is
``cross_entropy(logits[:, :-1], input_ids[:, 1:])`` weighted by ``loss_mask[:, 1:]``.
The first token of every example is never a loss position (nothing in its segment
precedes it), so no loss term ever reads across a segment boundary.

Training batches (:class:`TrainBatches`) drop the rows left over at the end of an
epoch, so every batch is full and jit compiles once; evaluation batches
(:func:`eval_batches`) keep every example and fill the last batch with empty rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from train.examples import Example
from train.ordering import epoch_permutation

Batch = dict[str, np.ndarray]
Row = tuple[int, ...]  # indices of the examples packed into one row


def assemble(rows: Sequence[Sequence[Example]], max_length: int, pad_id: int) -> Batch:
    """Lay out each row's examples side by side; see the module docstring for the fields.

    Every row must hold at most ``max_length`` tokens; an empty row is all padding.
    """
    shape = (len(rows), max_length)
    batch = {
        "input_ids": np.full(shape, pad_id, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
        "loss_mask": np.zeros(shape, np.int32),
    }
    for r, row in enumerate(rows):
        if sum(len(e.ids_L) for e in row) > max_length:
            raise ValueError(f"row {r} holds more than max_length={max_length} tokens")
        start = 0
        for segment, (ids_L, prompt_length) in enumerate(row, start=1):
            span = slice(start, start + len(ids_L))
            positions_L = np.arange(len(ids_L), dtype=np.int32)
            batch["input_ids"][r, span] = ids_L
            batch["segment_ids"][r, span] = segment
            batch["positions"][r, span] = positions_L
            batch["loss_mask"][r, span] = positions_L >= max(prompt_length, 1)
            start = span.stop
    return batch


def pack_next_fit(lengths_N: np.ndarray, order: Sequence[int], max_length: int) -> list[Row]:
    """Rows of example indices, taken in ``order``: an example that does not fit in the
    current row (``max_length`` tokens) starts a new one (next-fit; keeps the order)."""
    rows: list[Row] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths_N[i] > max_length:
            rows.append(tuple(current))
            current, used = [], 0
        current.append(int(i))
        used += int(lengths_N[i])
    if current:
        rows.append(tuple(current))
    return rows


def process_share(rows: Sequence, process_index: int, process_count: int) -> Sequence:
    """This process's contiguous, disjoint slice of a global batch's rows."""
    if len(rows) % process_count:
        raise ValueError(
            f"a global batch of {len(rows)} rows cannot be split evenly over "
            f"{process_count} processes; make data.batch_size a multiple of it"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
    per_process = len(rows) // process_count
    return rows[process_index * per_process : (process_index + 1) * per_process]


@dataclass(frozen=True)
class DataPosition:
    """Where a :class:`TrainBatches` stands: the next batch is ``step`` of ``epoch``."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, int]) -> DataPosition:
        """Inverse of :meth:`to_dict`; accepts numpy scalars (as restored from a checkpoint)."""
        return cls(epoch=int(state["epoch"]), step=int(state["step"]))


START = DataPosition()  # the first batch of epoch 0


class TrainBatches:
    """The training stream: shuffled per (seed, epoch), padded or packed, sharded per process.

    Iterating yields this process's ``[batch_size // process_count, max_length]`` share
    of each global batch and advances :attr:`position`; a new instance built with the
    same arguments and a saved ``position`` yields exactly the batches that followed it.
    Epochs run on forever; the training loop decides when to stop.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        batch_size: int,
        max_length: int,
        pad_id: int,
        packing: bool,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        position: DataPosition = START,
    ):
        process_share(range(batch_size), process_index, process_count)  # validates the split
        self._examples = examples
        self._lengths_N = np.array([len(e.ids_L) for e in examples], np.int64)
        self._batch_size, self._max_length, self._pad_id = batch_size, max_length, pad_id
        self._packing, self._seed = packing, seed
        self._process = (process_index, process_count)
        self._cached: tuple[int, list[Row]] | None = None
        if self.steps_in_epoch(0) == 0:
            raise ValueError(
                f"the training split fills {len(self.epoch_rows(0))} rows, fewer than "
                f"data.batch_size={batch_size}; lower the batch size or add data"
            )
        self._position = position
        self.batch_at(position)  # fail now, not mid-run, on a position from another data set

    @property
    def position(self) -> DataPosition:
        """The position of the batch the next ``next()`` returns."""
        return self._position

    def epoch_rows(self, epoch: int) -> list[Row]:
        """All rows of ``epoch`` in order (global, before batching); cached for one epoch."""
        if self._cached is None or self._cached[0] != epoch:
            order = epoch_permutation(len(self._examples), self._seed, epoch)
            rows = (
                pack_next_fit(self._lengths_N, order, self._max_length)
                if self._packing
                else [(int(i),) for i in order]
            )
            self._cached = (epoch, rows)
        return self._cached[1]

    def steps_in_epoch(self, epoch: int) -> int:
        """Full global batches in ``epoch`` (constant without packing)."""
        return len(self.epoch_rows(epoch)) // self._batch_size

    def batch_at(self, position: DataPosition) -> Batch:
        """This process's share of the global batch at ``position``."""
        steps = self.steps_in_epoch(position.epoch)
        if not 0 <= position.step < steps:
            raise ValueError(
                f"data position {position} is outside epoch {position.epoch}, which "
                f"has {steps} steps; was it saved with other data or batch settings?"
            )
        start = position.step * self._batch_size
        rows = process_share(
            self.epoch_rows(position.epoch)[start : start + self._batch_size], *self._process
        )
        return assemble(
            [[self._examples[i] for i in row] for row in rows], self._max_length, self._pad_id
        )

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self._position)
        epoch, step = self._position.epoch, self._position.step + 1
        if step == self.steps_in_epoch(epoch):
            epoch, step = epoch + 1, 0
        self._position = DataPosition(epoch, step)
        return batch


def eval_batches(
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_length: int,
    pad_id: int,
    process_index: int = 0,
    process_count: int = 1,
    num_batches: int | None = None,
) -> Iterator[Batch]:
    """Evaluation batches in data order, one example per row; the last global batch is
    filled with empty rows (zero ``loss_mask``). At most ``num_batches`` when given."""
    total = -(-len(examples) // batch_size)
    for step in range(total if num_batches is None else min(total, num_batches)):
        chunk = [[e] for e in examples[step * batch_size : (step + 1) * batch_size]]
        rows = chunk + [[] for _ in range(batch_size - len(chunk))]
        yield assemble(process_share(rows, process_index, process_count), max_length, pad_id)
