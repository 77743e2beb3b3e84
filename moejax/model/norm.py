"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * scale, computed in float32."""

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.params import ones_param


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = ones_param((dim,), (None,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * inv * self.scale[...].astype(jnp.float32)).astype(x.dtype)
