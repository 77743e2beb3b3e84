"""The `auto` backend: the dropless dispatch path measured fastest on a platform.

`auto` is resolved once, when a layer is built, to a concrete backend name, so
a run's logs and checkpoints name the path that actually ran. The table below
is the evidence, one entry per platform: the backend, and the committed result
it comes from. `auto` only ever picks a measured winner; a platform nobody has
measured yet gets the portable `sorted` path, and its entry says so:

  cpu  `sorted`: benchmarks/results/dispatch_cpu.md (sorted vs ragged_dot, one
       run: ragged_dot 5.7x slower at 8 experts, 52x at 64). Pallas kernels on
       CPU run in interpret mode (an emulation for tests), never a candidate.
  gpu  `sorted` until measured. The expectation (XLA's ragged_dot lowers to
       padded per-group matrices, ~15% MFU on H100, docs/papers/prior_work.md
       §2.3) favours `pallas`, but its Triton compile and speed are unchecked;
       scripts/device_check.sh measures them and records the winner in
       benchmarks/results/auto_backend.json, which replaces this entry.
  tpu  `sorted`, unmeasured, likewise (candidates: `pallas`, `ragged_dot`).
"""

import json
import os
from typing import NamedTuple

import jax


class Choice(NamedTuple):
  backend: str
  evidence: str


FASTEST: dict[str, Choice] = {
    "cpu": Choice("sorted", "measured: benchmarks/results/dispatch_cpu.md"),
    "gpu": Choice("sorted", "unmeasured: no GPU run of scripts/device_check.sh yet"),
    "tpu": Choice("sorted", "unmeasured: no TPU run of scripts/device_check.sh yet"),
}
FALLBACK = Choice("sorted", "no entry for this platform; the portable pure-JAX path")

# A device check (scripts/device_check.sh) records each platform's measured winner
# here; a recorded entry replaces the one above.
MEASURED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))), "benchmarks", "results", "auto_backend.json")


def _measured() -> dict[str, Choice]:
  if not os.path.exists(MEASURED):
    return {}
  with open(MEASURED) as f:
    table = json.load(f)
  return {platform: Choice(entry["backend"], f"measured: {entry['evidence']}")
          for platform, entry in table.items()}


FASTEST.update(_measured())


def choice(platform: str | None = None) -> Choice:
  return FASTEST.get(platform or jax.default_backend(), FALLBACK)


def resolve_backend(name: str, platform: str | None = None) -> str:
  """`auto` -> the platform's fastest backend; any other name unchanged."""
  return choice(platform).backend if name == "auto" else name
