"""Model FLOP utilisation: the model's training FLOPs per second per device over the
device's peak.

  achieved = tokens/s x train FLOPs/token (moejax/budget.py: 3 x forward) / devices
  MFU = achieved / peak

Peaks are the vendors' dense bf16 figures for known accelerators; on a CPU (or an
unknown device) the peak is measured once with a float32 matmul, so CPU MFU reads
as a share of what this machine's matmul reaches. --config.debug.peak_tflops
overrides both.
"""

from __future__ import annotations

import functools
import time

# device_kind substring -> dense bf16 TFLOP/s per device (vendor figures).
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0), ("A10", 125.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5", 197.0), ("TPU v4", 275.0),
)


@functools.lru_cache(maxsize=1)
def measured_matmul_tflops(n: int = 1024, repeats: int = 5) -> float:
  """The best of `repeats` timings of one jitted n x n float32 matmul, in TFLOP/s."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best / 1e12


def peak_tflops(device, override: float = 0.0) -> tuple[float, str]:
  """(peak TFLOP/s per device, where the number comes from)."""
  if override > 0:
    return float(override), "debug.peak_tflops"
  kind = str(getattr(device, "device_kind", ""))
  for name, peak in PEAK_TFLOPS:
    if name.lower() in kind.lower():
      return peak, f"{name} dense bf16 peak"
  return measured_matmul_tflops(), f"measured float32 matmul on this {device.platform}"


def utilisation(tokens_per_s: float, train_flops_per_token: float, devices: int,
                peak: float) -> dict:
  """perf/tflops_per_device and perf/mfu for one logging interval."""
  achieved = tokens_per_s * train_flops_per_token / max(devices, 1) / 1e12
  return {"perf/tflops_per_device": achieved, "perf/mfu": achieved / peak if peak else 0.0}
