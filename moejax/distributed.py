"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

Modes (`--jax_distributed`):
  off   never initialize (single process);
  on    always initialize, with the coordinator flags if given, else JAX's
        cluster auto-detection (Cloud TPU, Slurm, Open MPI, Kubernetes);
  auto  initialize when the flags or the environment say this is one of several
        processes, else run as a single process.
On CPU, cross-process collectives use gloo.
"""

import os

import jax
from absl import logging

# Environment variables whose presence means "one of several processes".
_CLUSTER_ENV = (
    "JAX_COORDINATOR_ADDRESS",   # generic
    "TPU_WORKER_HOSTNAMES",      # multi-host Cloud TPU VM
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def _multi_process_env() -> bool:
  if any(os.environ.get(v) for v in _CLUSTER_ENV):
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("JAX_COORDINATOR_ADDRESS") or
                                os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(os.environ.get(var, "1") or 1) > 1:
      return True
  return False


def initialize(mode: str = "auto", *, coordinator_address: str = "",
               num_processes: int = 0, process_id: int = -1) -> bool:
  """Initializes jax.distributed when asked to; returns True if it did."""
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"--jax_distributed must be auto, on or off, got {mode!r}.")
  explicit = bool(coordinator_address)
  if mode == "off" or (mode == "auto" and not explicit and not _multi_process_env()):
    return False
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=coordinator_address,
                  num_processes=num_processes or None,
                  process_id=process_id if process_id >= 0 else None)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
