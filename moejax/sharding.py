"""Device mesh, logical axis rules, and the shardings derived from them.

Parameters carry *logical* axis names (`logical_axes=('embed', 'mlp')` metadata on
each `nnx.Param`); one rules table (`config.sharding.rules`) maps a logical name to
mesh axes. Flax's own sharding metadata has been renamed several times
(`sharding` -> `sharding_names` -> `out_sharding`), so moejax keeps its own key and
reads it only here: a Flax rename touches nothing.

Mesh axes are always ('data', 'fsdp', 'expert', 'tensor') in Auto mode (GSPMD
propagation; explicit "sharding in types" mode is still moving in JAX).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
LOGICAL_AXES_KEY = "logical_axes"
# Mesh axes a batch is split over (data parallelism in the broad sense).
BATCH_AXES = ("data", "fsdp", "expert")


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Axis sizes with a single -1 filled so the product equals `num_devices`."""
  sizes = [int(getattr(mesh_cfg, a)) for a in MESH_AXES]
  fills = [i for i, s in enumerate(sizes) if s == -1]
  if len(fills) > 1:
    raise ConfigError(
        f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}; "
        "set all but one of --config.mesh.{data,fsdp,expert,tensor} explicitly.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(
        f"Mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
  known = math.prod(s for s in sizes if s != -1)
  if fills:
    if num_devices % known:
      raise ConfigError(
          f"The mesh axes {dict(zip(MESH_AXES, sizes))} multiply to {known}, which "
          f"does not divide the {num_devices} available devices; change "
          "--config.mesh.* so their product divides the device count.")
    sizes[fills[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"The mesh shape {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} "
        f"devices but {num_devices} are available; make the product of "
        "--config.mesh.{data,fsdp,expert,tensor} equal the device count, or set "
        "one of them to -1.")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with the four moejax axes, Auto mode."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_cfg, len(devices))
  if len(devices) == len(jax.devices()):
    # Topology-aware device order where the platform provides one.
    return jax.make_mesh(shape, MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def batch_axis_size(mesh: Mesh) -> int:
  """Number of ways a global batch is split."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_to_spec(logical_axes: Iterable[str | None], rules) -> P:
  """Maps logical axis names to a PartitionSpec with the rules table.

  A mesh axis is used at most once per spec: a later dimension that maps to an
  axis already taken stays replicated, so no rule set produces an invalid spec.
  """
  table = {name: axes for name, axes in rules}
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    axes = table.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    spec.append(axes if len(axes) > 1 else (axes[0] if axes else None))
  return P(*spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _variable_spec(var: nnx.Variable, rules) -> P:
  names = var.get_metadata().get(LOGICAL_AXES_KEY)
  if names is None:
    return P()
  return logical_to_spec(names, rules)


def state_specs(state: Any, rules) -> Any:
  """PartitionSpecs for an nnx.State (or any tree of nnx.Variables)."""
  return jax.tree.map(lambda v: v.replace(_variable_spec(v, rules)), state,
                      is_leaf=_is_variable)


def state_shardings(state: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for an nnx.State, dropping mesh axes a dimension can't split.

  A dimension whose size is not divisible by its mesh axes is left replicated
  (e.g. 2 kv heads over a tensor axis of 4) rather than failing deep in XLA.
  """

  def one(var):
    spec = _variable_spec(var, rules)
    shape = var.get_value().shape
    fixed = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
      if axes is None:
        fixed.append(None)
        continue
      names = (axes,) if isinstance(axes, str) else tuple(axes)
      size = math.prod(mesh.shape[a] for a in names)
      fixed.append(axes if dim % size == 0 else None)
    return var.replace(NamedSharding(mesh, P(*fixed)))

  return jax.tree.map(one, state, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, seq, ...] input: batch over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def process_batch_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """The rows [start, stop) of a global batch that this process's devices hold.

  Processes whose devices are replicas along the batch (e.g. a tensor axis
  spanning hosts) get the same rows; jax.make_array_from_process_local_data
  then takes exactly these rows from each process.
  """
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch, 1))
  spans = sorted({(ix[0].start or 0, global_batch if ix[0].stop is None else ix[0].stop)
                  for ix in index_map.values()})
  start, stop = spans[0][0], spans[-1][1]
  covered = sum(b - a for a, b in spans)
  if covered != stop - start:
    raise ConfigError(
        f"This process's devices hold non-contiguous batch rows {spans}; reorder the "
        "mesh axes so that each host's devices are contiguous along data/fsdp/expert.")
  return start, stop


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# --- activation constraints --------------------------------------------------
# The rules table is needed inside model code; it is set once per mesh context
# instead of being threaded through every module.
_ACTIVE_RULES: list[tuple] = []
_ACTIVE_MESHES: list[Mesh] = []


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules):
  """Enters `mesh` (jax.set_mesh) and makes `rules` the active logical rules."""
  _ACTIVE_RULES.append(tuple(rules))
  _ACTIVE_MESHES.append(mesh)
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _ACTIVE_RULES.pop()
    _ACTIVE_MESHES.pop()


def active_mesh() -> Mesh | None:
  """The mesh entered with `use_mesh`, or None (modules then run unsharded)."""
  return _ACTIVE_MESHES[-1] if _ACTIVE_MESHES else None


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside `use_mesh`."""
  if not _ACTIVE_RULES:
    return x
  return jax.lax.with_sharding_constraint(
      x, logical_to_spec(logical_axes, _ACTIVE_RULES[-1]))
