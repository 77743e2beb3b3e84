"""Test setup: 8 fake CPU devices, set before JAX starts. The repository root is on
sys.path through pytest's `pythonpath` setting (setup.cfg), so tests import
`tests.*`, `configs.*` and `experiments.*` as packages."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
