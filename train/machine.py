"""The machine a figure was measured on: CPU, cores, JAX devices, library versions.

Recorded beside every benchmark (benchmarks/) and experiment result (studies/), so a
figure can be read against where it was measured.
"""

from __future__ import annotations

import contextlib
import os
import platform
from importlib import metadata
from pathlib import Path


def machine() -> dict:
    """CPU model, core count, JAX devices and library versions."""
    import jax

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "peft"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()][:4],
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "versions": versions,
    }
