"""The `auto` backend: the dropless dispatch path measured fastest on a platform.

`auto` is resolved once, when a layer is built, to a concrete backend name, so
a run's logs and checkpoints name the path that actually ran. The table below
is the evidence, one entry per platform: the backend, and the committed result
it comes from. A platform nobody has measured yet says so, and names the prior
it falls back on rather than pretending to a measurement:

  cpu  `sorted`: benchmarks/results/dispatch_cpu.md (sorted vs ragged_dot vs
       pallas, one run). Pallas kernels on CPU run in interpret mode (an
       emulation for tests), so they are never a CPU candidate.
  gpu  `pallas`: not measured here yet (no GPU was lent while this was written;
       benchmarks/kernels.py is ready to run). Prior: XLA's ragged_dot lowers to
       padded per-group matrices on GPU (~15% MFU on H100 against ~78% for a
       Pallas kernel, systems.md 2.3), and `sorted` is a loop of small matmuls.
  tpu  `pallas` (the Mosaic grouped matmul): not measured here yet. Prior:
       megablox-style kernels are what MaxText's dropless path runs.

Change an entry only with a results file from benchmarks/kernels.py or
benchmarks/dispatch.py on that platform.
"""

from typing import NamedTuple

import jax


class Choice(NamedTuple):
  backend: str
  evidence: str


FASTEST: dict[str, Choice] = {
    "cpu": Choice("sorted", "measured: benchmarks/results/dispatch_cpu.md"),
    "gpu": Choice("pallas", "unmeasured here; prior from systems.md 2.3 (XLA ragged_dot ~15% "
                  "MFU on H100)"),
    "tpu": Choice("pallas", "unmeasured here; prior: megablox-style grouped matmul"),
}
FALLBACK = Choice("sorted", "no entry for this platform; the portable pure-JAX path")


def choice(platform: str | None = None) -> Choice:
  return FASTEST.get(platform or jax.default_backend(), FALLBACK)


def resolve_backend(name: str, platform: str | None = None) -> str:
  """`auto` -> the platform's fastest backend; any other name unchanged."""
  return choice(platform).backend if name == "auto" else name
