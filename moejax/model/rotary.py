"""Rotary position embeddings (Su et al. 2021), rotate-half convention.

For a head vector split into halves (x1, x2) and frequency w_i = theta^(-2i/d):
  rope(x, p) = (x1 cos(p w) - x2 sin(p w), x2 cos(p w) + x1 sin(p w)).
Angles are computed from the per-token `positions` (which restart at every
packed document), so no table bounds the sequence length.
"""

import jax
import jax.numpy as jnp


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """x: [batch, seq, heads, head_dim]; positions: [batch, seq] int."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [b, s, 1, half]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
