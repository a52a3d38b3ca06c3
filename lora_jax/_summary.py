"""`summary`: a table of what an adapter adds to a tree."""

from __future__ import annotations

from typing import Any

from lora_jax import _bank, _tree


def summary(params: Any) -> str:
    """A plain-text table: each adapted weight, its shape, rank, scale and trainable count.

    The last lines give the totals: trainable parameters (A, B, DoRA magnitudes and bias deltas)
    and their share of all parameters of the base model. The ranks and counts
    are read off the tree, so the table is true for any tree `lj.init` made. A bank
    (`lj.stack`) of n adapters shows its padded rank R as ``R x n`` and its scale as
    ``bank``; its count is every slot's A and B.
    """
    flat = _tree.flatten(params)
    size = lambda p: int(_tree.value(flat[p]).size)
    base_total = sum(size(p) for p in flat if not _tree.is_adapter_leaf(p))
    rows = []
    for path in _tree.adapted_weights(flat):
        a, b, s = (
            _tree.lora_path(path, x) for x in (_tree.A_SUFFIX, _tree.B_SUFFIX, _tree.SCALE_SUFFIX)
        )
        m = _tree.lora_path(path, _tree.MAGNITUDE_SUFFIX)
        scale = _tree.value(flat[s]).reshape(-1)
        rows.append(
            (
                _tree.path_str(path),
                str(tuple(_tree.value(flat[path]).shape)),
                str(_tree.value(flat[a]).shape[-1]),
                f"{float(scale[0]):g}" if scale.size else "-",
                size(a) + size(b) + (size(m) if m in flat else 0),
            )
        )
    for path in _bank.banked_weights(flat):
        a, b, s = (_bank.bank_path(path, x) for x in (_tree.BANK_A, _tree.BANK_B, _tree.BANK_SCALE))
        rank, n = _tree.value(flat[a]).shape[-1], _tree.value(flat[s]).shape[-1]
        shape = str(tuple(_tree.value(flat[path]).shape))
        rows.append((_tree.path_str(path), shape, f"{rank} x {n}", "bank", size(a) + size(b)))
    rows += [
        (_tree.path_str(p), str(tuple(_tree.value(flat[p]).shape)), "-", "-", size(p))
        for p in flat
        if _tree.leaf_name(p).endswith(_tree.DELTA_SUFFIX)
    ]
    trainable = sum(r[-1] for r in rows)
    header = ("path", "weight shape", "rank", "scale", "trainable")
    table = [header] + [r[:-1] + (f"{r[-1]:,}",) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    share = 100.0 * trainable / base_total if base_total else 0.0
    lines += ["", f"trainable: {trainable:,} of {base_total:,} base parameters ({share:.4f}%)"]
    return "\n".join(lines)
