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
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

import lora_jax as lj
from lora_jax import fingerprint as lj_fingerprint

META_FILE = "adapter.json"
WEIGHTS_DIR = "weights"


class AdapterError(ValueError):
    """An adapter directory that cannot be used with the given base; names the fix."""


def _flat(tree: Any) -> dict[str, Any]:
    """``{"a/b/kernel": leaf}``."""
    return {"/".join(p): v for p, v in traverse_util.flatten_dict(tree).items()}


def _unflat(flat: Mapping[str, Any]) -> Any:
    """Inverse of :func:`_flat`."""
    return traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in flat.items()})


def fingerprint(base_params: Any) -> dict[str, Any]:
    """``{"leaves": {path: {"shape", "dtype"}}, "sample_sha256": hex}`` of a base tree.

    The leaves must be addressable from this process (e.g. fresh from ``models.load``).
    """
    flat = sorted(_flat(base_params).items())
    leaves = {path: {"shape": list(np.shape(leaf)), "dtype": str(np.asarray(leaf).dtype)}
              for path, leaf in flat}
    return {"leaves": leaves, "sample_sha256": lj_fingerprint.sha256(flat)}


def artifact(params: Any, trainable_mask: Any, base_params: Any) -> Any:
    """The leaves of ``params`` that are trainable or absent from the base (LoRA scales)."""
    base = _flat(base_params)
    mask = _flat(trainable_mask)
    kept = {p: v for p, v in _flat(params).items() if mask[p] or p not in base}
    return _unflat(kept)


def save_adapter(directory: str | Path, tree: Any, *, method: str, model_name: str,
                 lora: Mapping[str, Any] | None, base_fingerprint: Mapping[str, Any],
                 model_options: Mapping[str, Any] | None = None) -> Path:
    """Write ``tree`` (from :func:`artifact`) and its metadata; every process calls this.

    ``model_options``: how the base was loaded (the run config's ``model`` section:
    dtype, param_dtype, scan_layers, remat), recorded for whoever loads it again.
    """
    directory = Path(directory).resolve()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / WEIGHTS_DIR, tree, force=True)
    if jax.process_index() == 0:
        meta = {"method": method, "model": model_name,
                "model_options": dict(model_options) if model_options else None,
                "lora": dict(lora) if lora else None,
                "leaves": {p: {"shape": list(v.shape), "dtype": str(v.dtype)}
                           for p, v in _flat(tree).items()},
                "base_fingerprint": dict(base_fingerprint)}
        (directory / META_FILE).write_text(json.dumps(meta, indent=1))
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The adapter's ``adapter.json``."""
    file = Path(directory) / META_FILE
    if not file.is_file():
        raise AdapterError(f"{directory} is not an adapter directory: {META_FILE} is missing; "
                           f"pass the 'adapter' directory of a finished run")
    return json.loads(file.read_text())


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
            raise AdapterError(f"wrong base model: {where}, whose parameter {path!r} is {want}, "
                               f"but in the given base it is {got}; load that model instead")
    if same_weights and expected["sample_sha256"] != found["sample_sha256"]:
        raise AdapterError(f"wrong base model: {where}; the given base has the same shapes but "
                           f"different weights (sampled-value hash {found['sample_sha256'][:12]} "
                           f"!= {expected['sample_sha256'][:12]}); load the exact checkpoint it "
                           f"was trained on, or skip this check explicitly (--skip-base-check)")


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
    like = _unflat({p: jax.ShapeDtypeStruct(tuple(v["shape"]), v["dtype"], sharding=device)
                    for p, v in meta["leaves"].items()})
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore(directory / WEIGHTS_DIR, like)
    except Exception as e:
        raise AdapterError(f"the weights in {directory / WEIGHTS_DIR} cannot be read "
                           f"({type(e).__name__}: {str(e)[:300]}); the directory is truncated or "
                           f"corrupted: re-export it from the run's checkpoints") from e
    replaced = _flat(tree)
    frozen = {p: v for p, v in _flat(base_params).items() if p not in replaced}
    return lj.combine(_unflat(frozen), tree)
