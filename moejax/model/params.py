"""Parameter creation with logical axis names (read by moejax/sharding.py)."""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.layer_plan import layer_applications
from moejax.sharding import LOGICAL_AXES_KEY


def residual_depth(cfg) -> int:
  """Residual branches' layers a token passes through: model.num_layers, plus
  (R - 1) per looped layer. Output projections are initialised with
  std / sqrt(2 * depth) (GPT-2), so a looped model starts with the residual
  stream scale of the unrolled model of the same effective depth."""
  return sum(layer_applications(cfg))


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
