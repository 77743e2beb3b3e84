"""Parameter creation with logical axis names (read by moejax/sharding.py)."""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.sharding import LOGICAL_AXES_KEY


def param(rngs: nnx.Rngs, shape: Sequence[int], logical_axes: Sequence[str | None],
          *, std: float, dtype=jnp.float32) -> nnx.Param:
  """A normal(0, std) parameter tagged with its logical axes."""
  value = std * jax.random.normal(rngs.params(), tuple(shape), dtype)
  return nnx.Param(value, **{LOGICAL_AXES_KEY: tuple(logical_axes)})


def ones_param(shape: Sequence[int], logical_axes: Sequence[str | None],
               dtype=jnp.float32) -> nnx.Param:
  return nnx.Param(jnp.ones(tuple(shape), dtype),
                   **{LOGICAL_AXES_KEY: tuple(logical_axes)})


def zeros_param(shape: Sequence[int], logical_axes: Sequence[str | None],
                dtype=jnp.float32) -> nnx.Param:
  return nnx.Param(jnp.zeros(tuple(shape), dtype),
                   **{LOGICAL_AXES_KEY: tuple(logical_axes)})
