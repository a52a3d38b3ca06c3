"""The final artifact: an adapter-only directory, checked against its base model on load.

Layout of ``<output_dir>/adapter/``::

    weights/        orbax (StandardSave) tree of what the run adds to or replaces in the
                    base: for LoRA every factor, scale and bias delta (``lj.adapter``);
                    for BitFit the biases; for full fine-tuning every parameter
    adapter.json    method, model name and load options, LoRA config (``lj.LoraConfig``
                    fields), the shape/dtype of every saved leaf, the base's fingerprint

The fingerprint is the path, shape and dtype of every base parameter plus a SHA-256
over a fixed sample of each one's values (``lora_jax.fingerprint``: 64 evenly spaced
elements): cheap to compute, and it tells a different checkpoint of the same
architecture apart. :func:`load_adapter` refuses a base whose fingerprint differs.

:func:`save_adapter` claims its directory (``train/rundir.py``, kind ``"adapter"``): it
writes into a new or empty directory, or one it marked before (a re-save), and refuses
anything else, so it never overwrites files it did not write. :func:`read_meta` refuses a
damaged ``adapter.json`` and :func:`load_adapter` one that disagrees with the weights on
disk (a shape or dtype), each with one line naming the file, the problem and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

import lora_jax as lj
from lora_jax import fingerprint as lj_fingerprint
from train import layout, rundir
from train.errors import UserError
from train.orbax_loops import settled_restore

# how to get a damaged adapter directory back
REWRITE = (
    "restore it from a copy, or write it again (a run's: rerun `lora-jax train` on its "
    "config.yaml, which rewrites the adapter from the final checkpoint; an imported one: "
    "rerun `lora-jax import-peft`)"
)


class AdapterError(UserError, ValueError):
    """An adapter directory that cannot be used with the given base; names the fix."""


def fingerprint(base_params: Any) -> dict[str, Any]:
    """``{"leaves": {path: {"shape", "dtype"}}, "sample_sha256": hex}`` of a base tree.

    The leaves may be host arrays or global arrays spread over many processes: only the
    sampled values (``lj_fingerprint.picks``) of each are gathered, never a whole leaf.
    """
    flat = sorted(lj.flatten_paths(base_params).items())
    leaves = {
        path: {"shape": list(np.shape(leaf)), "dtype": str(np.dtype(leaf.dtype))}
        for path, leaf in flat
    }
    samples = [(path, _sampled(leaf)) for path, leaf in flat]
    return {"leaves": leaves, "sample_sha256": lj_fingerprint.sha256(samples)}


def _sampled(leaf: Any) -> np.ndarray:
    """The fingerprint's sampled values of ``leaf``, on this host."""
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
        return np.asarray(leaf)
    picks = lj_fingerprint.picks(leaf.size)
    replicated = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
    return np.asarray(jax.jit(lambda x: x.reshape(-1)[picks], out_shardings=replicated)(leaf))


def artifact(params: Any, trainable_mask: Any, base_params: Any) -> Any:
    """The leaves of ``params`` that are trainable or absent from the base (LoRA scales)."""
    base = lj.flatten_paths(base_params)
    mask = lj.flatten_paths(trainable_mask)
    kept = {p: v for p, v in lj.flatten_paths(params).items() if mask[p] or p not in base}
    return lj.unflatten_paths(kept)


def save_adapter(
    directory: str | Path,
    tree: Any,
    *,
    method: str,
    model_name: str,
    lora: Mapping[str, Any] | None,
    base_fingerprint: Mapping[str, Any],
    model_options: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``tree`` (from :func:`artifact`) and its metadata; every process calls this.

    ``model_options``: how the base was loaded (the run config's ``model`` section:
    dtype, param_dtype, scan_layers, remat), recorded for whoever loads it again.
    ``extra``: further adapter.json entries (``lora-jax import-peft``: where it came from).

    ``directory`` is claimed as an ``"adapter"`` directory first (process 0; the others
    write only after it, inside orbax's save): a new or empty one, or an adapter directory
    saved before. Raises ``rundir.DirectoryError`` for anything else, writing nothing.
    """
    directory = Path(directory).resolve()
    if jax.process_index() == 0:
        rundir.claim(directory, layout.Kind.ADAPTER, what="adapter directory")
    with ocp.StandardCheckpointer() as checkpointer:
        # force: replaces weights/ only inside the adapter directory claimed above (ours)
        checkpointer.save(directory / layout.ADAPTER_WEIGHTS_DIR, tree, force=True)
    if jax.process_index() == 0:
        meta = {
            "method": method,
            "model": model_name,
            "model_options": dict(model_options) if model_options else None,
            "lora": dict(lora) if lora else None,
            "leaves": {
                p: {"shape": list(v.shape), "dtype": str(v.dtype)}
                for p, v in lj.flatten_paths(tree).items()
            },
            "base_fingerprint": dict(base_fingerprint),
            **(extra or {}),
        }
        (directory / layout.ADAPTER_META_FILE).write_text(json.dumps(meta, indent=1))
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The adapter's ``adapter.json``, checked for the fields loading it needs.

    Raises AdapterError (one line: the file, what is wrong, the fix) for a missing,
    truncated or garbled file.
    """
    file = Path(directory) / layout.ADAPTER_META_FILE
    if not file.is_file():
        raise AdapterError(
            f"{directory} is not an adapter directory: {layout.ADAPTER_META_FILE} is missing; "
            f"pass the 'adapter' directory of a finished run"
        )
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AdapterError(f"{file} is damaged: not valid JSON ({reason}); {REWRITE}") from None
    problem = _meta_problem(meta)
    if problem:
        raise AdapterError(f"{file} is damaged: {problem}; {REWRITE}")
    return meta


def _meta_problem(meta: Any) -> str | None:
    """What makes ``meta`` unusable as an adapter.json, or None."""
    if not isinstance(meta, dict):
        return f"it holds a JSON {type(meta).__name__}, not an object"
    for key, kind in (
        ("method", str),
        ("model", str),
        ("leaves", dict),
        ("base_fingerprint", dict),
    ):
        if not isinstance(meta.get(key), kind):
            return (
                f"{key!r} is missing"
                if key not in meta
                else f"{key!r} is {type(meta[key]).__name__}, expected {kind.__name__}"
            )
    if not meta["leaves"]:
        return "'leaves' is empty"
    for label, leaves in (
        ("leaves", meta["leaves"]),
        ("base_fingerprint.leaves", meta["base_fingerprint"].get("leaves")),
    ):
        if not isinstance(leaves, dict):
            return f"{label!r} is missing"
        for path, leaf in leaves.items():
            if not _leaf_spec_ok(leaf):
                return f"{label}[{path!r}] is {leaf!r}, expected {{'shape': [ints], 'dtype': name}}"
    if not isinstance(meta["base_fingerprint"].get("sample_sha256"), str):
        return "'base_fingerprint.sample_sha256' is missing"
    return None


def _leaf_spec_ok(leaf: Any) -> bool:
    """``{"shape": [non-negative ints], "dtype": a NumPy/ml_dtypes name}``?"""
    if not (
        isinstance(leaf, dict)
        and isinstance(leaf.get("shape"), list)
        and isinstance(leaf.get("dtype"), str)
    ):
        return False
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in leaf["shape"]):
        return False
    try:
        jax.numpy.dtype(leaf["dtype"])
    except TypeError:
        return False
    return True


def check_base(meta: Mapping[str, Any], base_params: Any, *, same_weights: bool = True) -> None:
    """Raise AdapterError unless ``base_params`` has the fingerprint the adapter recorded.

    Shapes and dtypes must always match; ``same_weights=False`` accepts other values
    (the explicit override for, e.g., a re-quantised copy of the base).
    """
    expected, found = meta["base_fingerprint"], fingerprint(base_params)
    where = f"the adapter was trained on {meta['model']!r}"
    for path in sorted(expected["leaves"].keys() | found["leaves"].keys()):
        want, got = expected["leaves"].get(path), found["leaves"].get(path)
        if want != got:
            raise AdapterError(
                f"wrong base model: {where}, whose parameter {path!r} is {want}, "
                f"but in the given base it is {got}; load that model instead"
            )
    if same_weights and expected["sample_sha256"] != found["sample_sha256"]:
        raise AdapterError(
            f"wrong base model: {where}; the given base has the same shapes but "
            f"different weights (sampled-value hash {found['sample_sha256'][:12]} "
            f"!= {expected['sample_sha256'][:12]}); load the exact checkpoint it "
            f"was trained on, or skip this check explicitly (--skip-base-check)"
        )


def load_adapter(directory: str | Path, base_params: Any, *, check_weights: bool = True) -> Any:
    """The base params with the adapter added (LoRA leaves) or swapped in (trained leaves).

    Checks the base fingerprint first (``check_weights=False`` skips only the comparison
    of sampled values); the result is a plain tree for ``model.apply`` (through
    ``lj.apply`` when it holds LoRA leaves) or ``lj.merge``.
    """
    directory = Path(directory).resolve()
    meta = read_meta(directory)
    check_base(meta, base_params, same_weights=check_weights)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    like = lj.unflatten_paths(
        {
            p: jax.ShapeDtypeStruct(tuple(v["shape"]), v["dtype"], sharding=device)
            for p, v in meta["leaves"].items()
        }
    )
    try:
        # settled_restore: a failed restore leaves no orphaned reads behind
        with settled_restore(), ocp.StandardCheckpointer() as checkpointer:
            weights = directory / layout.ADAPTER_WEIGHTS_DIR
            on_disk = lj.flatten_paths(checkpointer.metadata(weights).item_metadata.tree)
            _check_leaves(directory, meta["leaves"], on_disk)
            tree = checkpointer.restore(weights, like)
    except AdapterError:
        raise
    except Exception as e:
        reason = " ".join(str(e).split())[:300]
        raise AdapterError(
            f"the weights in {directory / layout.ADAPTER_WEIGHTS_DIR} cannot be read "
            f"({type(e).__name__}: {reason}); the directory is truncated or "
            f"corrupted: re-export it from the run's checkpoints"
        ) from e
    replaced = lj.flatten_paths(tree)
    frozen = {p: v for p, v in lj.flatten_paths(base_params).items() if p not in replaced}
    return lj.combine(lj.unflatten_paths(frozen), tree)


def _check_leaves(directory: Path, recorded: Mapping[str, Any], on_disk: Mapping[str, Any]) -> None:
    """AdapterError unless adapter.json records the leaves, shapes and dtypes the weights have
    (orbax would otherwise cast a leaf to the recorded dtype, or fail with a traceback)."""
    file = directory / layout.ADAPTER_META_FILE
    for path in sorted(recorded.keys() | on_disk.keys()):
        if path not in on_disk:
            raise AdapterError(
                f"{file} lists leaf {path!r}, which {directory / layout.ADAPTER_WEIGHTS_DIR} does "
                f"not hold: the two do not belong together; {REWRITE}"
            )
        if path not in recorded:
            raise AdapterError(
                f"{directory / layout.ADAPTER_WEIGHTS_DIR} holds leaf {path!r}, which {file} does "
                f"not list: the two do not belong together; {REWRITE}"
            )
        want = recorded[path]
        got = {"shape": list(on_disk[path].shape), "dtype": str(np.dtype(on_disk[path].dtype))}
        if [want["shape"], str(np.dtype(jax.numpy.dtype(want["dtype"])))] != [
            got["shape"],
            got["dtype"],
        ]:
            raise AdapterError(
                f"{file} records leaf {path!r} as {want['dtype']}{want['shape']}, "
                f"but {directory / layout.ADAPTER_WEIGHTS_DIR} holds {got['dtype']}"
                f"{got['shape']}; nothing is cast or reshaped on load: {REWRITE}"
            )
