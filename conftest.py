"""Test-wide setup: the CPU backend with 8 virtual devices, so sharding runs on any machine.

The test install has libtpu (the [tpu-plan] extra, for the TPU-compiler plan tests); JAX
would otherwise try to start a TPU client on machines that have no TPU. Both settings are
environment variables, so processes the tests start inherit them.

XLA reads this flag once, when JAX first initialises its backend, so it is set
here — before any test module imports jax — and added to any other XLA_FLAGS
given. A device count given in XLA_FLAGS wins; the tests that need 8 devices
skip, saying so, when there are fewer.
"""

import os

DEVICE_COUNT = "--xla_force_host_platform_device_count"

_flags = os.environ.get("XLA_FLAGS", "")
if DEVICE_COUNT not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} {DEVICE_COUNT}=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
