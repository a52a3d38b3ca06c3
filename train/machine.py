"""The machine a figure was measured on: CPU, cores, JAX devices, library versions, and
the CPU regime while it was measured (:func:`matmul_rate`, :func:`same_regime`).

Recorded beside every benchmark (benchmarks/) and experiment result (studies/), so a
figure can be read against where it was measured.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

import numpy as np


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


def matmul_rate(n: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of a numpy n×n float32 matmul: a probe of the CPU regime right now.

    The 2-vCPU machines here sometimes deliver one core's worth of work for
    minutes; comparing the probe before and after a timed section tells whether
    the figures between them were taken in one regime.
    """
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def same_regime(probes: list[float], tolerance: float = 1.25) -> bool:
    """Whether matmul probes (GFLOP/s) agree within `tolerance` (max / min): one CPU regime."""
    return max(probes) <= tolerance * min(probes)
