"""Test-wide setup: 8 virtual CPU devices, so sharding runs on any machine.

XLA reads this flag once, when JAX first initialises its backend, so it is set
here — before any test module imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
