"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

Modes (`--jax_distributed`):
  off   never initialize (single process);
  on    always initialize: with the coordinator settings if given, else with
        JAX's cluster auto-detection (Cloud TPU, Slurm, Open MPI, Kubernetes);
        one sentence when neither finds a cluster;
  auto  initialize when the flags or the environment say this is one of several
        processes, else run as a single process.
Coordinator settings come from the flags, else from the environment variables
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. On CPU,
cross-process collectives use gloo.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
from absl import logging

from moejax.errors import ConfigError


def _cluster_detected(env: Mapping[str, str]) -> bool:
  """True where JAX's own auto-detection will find several processes."""
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return True  # multi-host Cloud TPU VM
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True  # multi-slice TPU
  return any(int(env.get(v, "1") or 1) > 1 for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def plan(mode: str, *, coordinator_address: str = "", num_processes: int = 0,
         process_id: int = -1, env: Mapping[str, str] | None = None) -> dict | None:
  """Keyword arguments for jax.distributed.initialize, or None for one process."""
  if mode not in ("auto", "on", "off"):
    raise ConfigError(f"--jax_distributed must be auto, on or off, got {mode!r}.")
  env = os.environ if env is None else env
  address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
  count = num_processes or int(env.get("JAX_NUM_PROCESSES", "0") or 0)
  index = process_id if process_id >= 0 else int(env.get("JAX_PROCESS_ID", "-1") or -1)
  if count < 0:
    raise ConfigError(f"--num_processes={count} must be a positive number of processes.")
  if index >= 0 and count < 1 and not address:
    raise ConfigError(
        f"--process_id={index} needs --num_processes (and --coordinator_address): a "
        "process index alone would train as one process.")
  if mode == "off":
    return None
  if address:
    if count < 1 or not 0 <= index < count:
      raise ConfigError(
          f"A coordinator address ({address}) needs the number of processes and this "
          f"process's index (got {count} and {index}); pass --num_processes and "
          "--process_id, or set JAX_NUM_PROCESSES and JAX_PROCESS_ID.")
    return dict(coordinator_address=address, num_processes=count, process_id=index)
  if count > 1:
    raise ConfigError(
        f"--num_processes={count} needs the coordinator's host:port (process 0's); pass "
        "--coordinator_address or set JAX_COORDINATOR_ADDRESS, else this would train as "
        "one process.")
  if mode == "on" or _cluster_detected(env):
    return {}  # JAX detects the cluster
  return None


def initialize(mode: str = "auto", *, coordinator_address: str = "",
               num_processes: int = 0, process_id: int = -1) -> bool:
  """Initializes jax.distributed when `plan` says so; returns True if it did."""
  kwargs = plan(mode, coordinator_address=coordinator_address,
                num_processes=num_processes, process_id=process_id)
  if kwargs is None:
    return False
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  if platforms in ("", "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    if kwargs:
      raise
    raise ConfigError(
        "--jax_distributed=on found no cluster to join (JAX's auto-detection: "
        f"{' '.join(str(e).split())[:160]}); pass --coordinator_address, --num_processes "
        "and --process_id, or use --jax_distributed=auto for one process.") from None
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def check_platform() -> None:
  """Starts JAX's backend now, so that a platform that is not there (e.g.
  JAX_PLATFORMS=cuda on a machine without a GPU or without jax's CUDA plugin) is
  one sentence rather than an AssertionError deep inside the first jax call."""
  try:
    jax.devices()
  except (RuntimeError, AssertionError) as e:
    asked = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    detail = " ".join(str(e).split())[:200]
    raise ConfigError(
        f"JAX could not start the platform {asked or '(default)'!r} on this machine"
        f"{f' ({detail})' if detail else ''}; unset JAX_PLATFORMS (or --jax_platforms) to use "
        "what is here, or install the jax plugin for that accelerator.") from None
