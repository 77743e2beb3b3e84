"""IterAdaLN: the pre-norm modulation of a looped block (LoopMoE).

At iteration k of the shared block, for the normalised input n = RMSNorm(h) of
a sublayer F (attention or the MoE FFN):

    v_k      = W2 SiLU(W1 PE(k) + b1) + b2          (a function of k, not a table)
    c        = SiLU(v_k + W_h n)                       [tokens, a]
    (g, b, a) = W_mod c + b_mod                        (W_mod, b_mod zero-initialised)
    h'       = h + (1 + a) * F((1 + g) * n + b)

PE is the fixed sinusoidal encoding of the iteration index. With W_mod = 0 the
block starts as the plain loop ("Loop Base"), the AdaLN-Zero idea. Choices the
sources leave open (docs/papers/loopmoe.md §a), each a config field or stated here:
  * the token projection reads the current, normalised hidden state n (not a
    pre-loop state, and normalised so its scale does not grow with depth);
  * each sublayer (attention, FFN) of each looped layer has its own IterAdaLN;
  * the output gate (1 + a) is kept (loop.adaln_gate; off = shift and scale only),
    written as 1 + a so that a zero W_mod leaves the plain loop, not a dead block.
Per token it costs W_h [d, a] and W_mod [a, 3d]; v_k is computed once per
iteration. loop.adaln_dim (a) is small so the overhead stays near 1% of FLOPs.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.params import param, zeros_param


def sinusoidal_encoding(index, dim: int) -> jax.Array:
  """PE(k) = [sin(k w_i), cos(k w_i)], w_i = 10000^(-2i/dim), for a scalar k."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.asarray(index, jnp.float32) * freqs
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])


class IterAdaLN(nnx.Module):

  def __init__(self, d_model: int, dim: int, pe_dim: int, *, gate: bool, init_std: float,
               rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.pe_dim, self.gate = pe_dim, gate
    mods = 3 if gate else 2
    self.w1 = param(rngs, (pe_dim, dim), (None, None), std=init_std, dtype=param_dtype)
    self.b1 = zeros_param((dim,), (None,), param_dtype)
    self.w2 = param(rngs, (dim, dim), (None, None), std=init_std, dtype=param_dtype)
    self.b2 = zeros_param((dim,), (None,), param_dtype)
    self.w_h = param(rngs, (d_model, dim), ("embed", None), std=init_std, dtype=param_dtype)
    self.w_mod = zeros_param((dim, mods * d_model), (None, None), param_dtype)
    self.b_mod = zeros_param((mods * d_model,), (None,), param_dtype)

  def iteration_vector(self, loop_index) -> jax.Array:
    pe = sinusoidal_encoding(loop_index, self.pe_dim)
    hidden = jax.nn.silu(pe @ self.w1[...].astype(jnp.float32) + self.b1[...])
    return hidden @ self.w2[...].astype(jnp.float32) + self.b2[...]

  def __call__(self, n: jax.Array, loop_index) -> tuple[jax.Array, jax.Array | None]:
    """n: the normalised sublayer input [..., d] -> (modulated input, output gate
    or None)."""
    n32 = n.astype(jnp.float32)
    c = jax.nn.silu(self.iteration_vector(loop_index)
                    + n32 @ self.w_h[...].astype(jnp.float32))
    mod = c @ self.w_mod[...].astype(jnp.float32) + self.b_mod[...].astype(jnp.float32)
    parts = jnp.split(mod, 3 if self.gate else 2, axis=-1)
    out = ((1.0 + parts[0]) * n32 + parts[1]).astype(n.dtype)
    return out, ((1.0 + parts[2]).astype(n.dtype) if self.gate else None)
