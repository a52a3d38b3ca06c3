"""One process of a multi-process `models.load(..., shardings=...)` (tests/test_models_sharded_load.py).

    python tests/sharded_load_driver.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT.json CHECKS_JSON

CHECKS_JSON is a list of loads, each {"source": name or path, "options": {...}, "mesh": [data,
fsdp, tensor], "rules": {logical axis name: mesh axis}}; every process makes the same loads.
OUT.json gets, per load: this process's resident memory (kB of /proc/self/status) before it,
at its peak and after it (a measure of the load alone for the first load only: later ones
reuse memory that earlier ones freed), and every shard this process holds: its index and the
SHA-256 of its bytes.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import models

AXES = ("data", "fsdp", "tensor")


def status_kb(field: str) -> int:
    """A memory figure of this process (VmRSS, VmHWM) in kB."""
    line = next(
        x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field)
    )
    return int(line.split()[1])


def shardings_by_rules(mesh: Mesh, rules: dict[str, str]):
    """`shardings` for models.load: each axis named in `rules` over its mesh axis (when that
    divides it), every other axis replicated."""

    def spec(names: tuple[str | None, ...], shape: tuple[int, ...]) -> PartitionSpec:
        axes = [rules.get(n) if n is not None else None for n in names]
        return PartitionSpec(
            *(a if a is not None and d % mesh.shape[a] == 0 else None for a, d in zip(axes, shape))
        )

    def shardings(model: models.Decoder, shapes: Any) -> Any:
        return jax.tree.map(
            lambda names, s: NamedSharding(mesh, spec(names, s.shape)),
            models.logical_axes(model),
            shapes,
            is_leaf=lambda x: isinstance(x, tuple),
        )

    return shardings


def shard_records(params: Any) -> dict[str, list[dict[str, Any]]]:
    """{"a/b/kernel": [{index: [[start, stop], ...], sha256, dtype}, ...]} of this process's
    shards."""
    records = {}
    for path, array in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(k.key for k in path)
        records[name] = [
            {
                "index": [list(s.indices(n)[:2]) for s, n in zip(shard.index, array.shape)],
                "sha256": hashlib.sha256(np.ascontiguousarray(shard.data).tobytes()).hexdigest(),
                "dtype": str(shard.data.dtype),
            }
            for shard in array.addressable_shards
        ]
    return records


def main(coordinator: str, num_processes: str, process_id: str, out: str, checks: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
    results = []
    for check in json.loads(checks):
        mesh = Mesh(np.asarray(jax.devices()).reshape(check["mesh"]), AXES)
        shardings = shardings_by_rules(mesh, check["rules"])
        # Trace the model's shapes once first (abstract_load, logical_axes): Python's and
        # JAX's caches of that are the same whatever the model's size, not the load's memory.
        model, shapes = models.abstract_load(check["source"], **check["options"])
        shardings(model, shapes)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
        before = status_kb("VmRSS")
        _, params, _ = models.load(check["source"], shardings=shardings, **check["options"])
        peak, after = status_kb("VmHWM"), status_kb("VmRSS")
        results.append(
            {
                "rss_before_kb": before,
                "rss_peak_kb": peak,
                "rss_after_kb": after,
                "shards": shard_records(params),
            }
        )
        del params
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
