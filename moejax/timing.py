"""Wall-clock timing of jitted calls, shared by the benchmarks and the timing rows
of experiments: one call, waiting until its outputs are ready."""

import time


def time_once(fn, args) -> float:
  """Seconds of one call of fn(*args), waiting for its outputs."""
  import jax  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0
