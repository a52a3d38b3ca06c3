"""`LazyTensor`: a checkpoint tensor, or a transposed / indexed / stacked view of one, that
reads nothing until it is converted with `np.asarray` — and then only the elements the view
holds. Loading builds every parameter as such a view of its checkpoint tensor (the layout
transforms of models/families.py `to_ours` apply to views as to arrays), so each process
reads only the blocks its devices hold (models/loaders/arrays.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# integer indices along each stored axis -> the stored tensor's block at their outer product
Read = Callable[[tuple[np.ndarray, ...]], np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class LazyTensor:
    """A view of a stored tensor that `read` gives blocks of.

    indices: per stored axis, the indices (int arrays) this view holds, in order.
    axes: view axis k is stored axis `axes[k]` (a permutation: `.T` reverses it).

    Indexing is outer (orthogonal) indexing: one slice (step 1) or 1-D int array per axis,
    each selecting along its own axis (numpy's `a[np.ix_(...)]`, not its fancy indexing);
    missing trailing axes and `...` select everything; integers are not accepted.
    """

    read: Read
    indices: tuple[np.ndarray, ...]
    axes: tuple[int, ...]

    @classmethod
    def of(cls, shape: Sequence[int], read: Read) -> LazyTensor:
        """The whole stored tensor of `shape`."""
        return cls(read, tuple(np.arange(n) for n in shape), tuple(range(len(shape))))

    @classmethod
    def wrap(cls, array: np.ndarray) -> LazyTensor:
        """An array already in memory, as a view (so that every parameter is one)."""
        return cls.of(array.shape, lambda indices: array[np.ix_(*indices)])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(self.indices[a]) for a in self.axes)

    @property
    def T(self) -> LazyTensor:
        return dataclasses.replace(self, axes=self.axes[::-1])

    def __getitem__(self, key: Any) -> LazyTensor:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = key.index(Ellipsis)
            fill = (slice(None),) * (len(self.axes) - len(key) + 1)
            key = key[:at] + fill + key[at + 1 :]
        if len(key) > len(self.axes):
            raise IndexError(f"{len(key)} indices for a tensor of shape {self.shape}")
        indices = list(self.indices)
        for axis, k in zip(self.axes, key, strict=False):
            if not isinstance(k, slice | np.ndarray) or (isinstance(k, slice) and k.step):
                raise TypeError(f"a LazyTensor takes slices of step 1 and int arrays, not {k!r}")
            indices[axis] = indices[axis][k]
        return dataclasses.replace(self, indices=tuple(indices))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        block = self.read(self.indices).transpose(self.axes)
        return block if dtype is None else block.astype(dtype, copy=False)


def stack(tensors: Sequence[LazyTensor]) -> LazyTensor:
    """`tensors` (of one shape) stacked along a new leading axis; a block reads only the
    tensors its leading indices select."""
    shape = (len(tensors), *tensors[0].shape)

    def read(indices: tuple[np.ndarray, ...]) -> np.ndarray:
        return np.stack([np.asarray(tensors[i][indices[1:]]) for i in indices[0]])

    return LazyTensor.of(shape, read)


def zeros(shape: Sequence[int]) -> LazyTensor:
    """float32 zeros of `shape`; only the blocks read are made."""
    return LazyTensor.of(shape, lambda indices: np.zeros([len(i) for i in indices], np.float32))


def bounds(indices: tuple[np.ndarray, ...]) -> tuple[slice, ...]:
    """The smallest box of slices that holds `indices` (one int array per axis)."""
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in indices)


def select(box: np.ndarray, start: Sequence[int], indices: tuple[np.ndarray, ...]) -> np.ndarray:
    """The outer-product block of `indices` from `box`, a block read from `start` on that
    holds them (`bounds`): `box` itself when the indices are contiguous ranges."""
    local = [i - s for i, s in zip(indices, start, strict=True)]
    if all(np.array_equal(i, np.arange(n)) for i, n in zip(local, box.shape, strict=True)):
        return box
    return box[np.ix_(*local)]
