"""BatchNorm without scale or shift over the token axis (OmniMoE's router norm).

    train:  y = (a - mean_t a) / sqrt(var_t a + eps);
            running <- (1 - momentum) * running + momentum * batch statistic
    eval:   y = (a - running_mean) / sqrt(running_var + eps)

PyTorch `BatchNorm1d(affine=False)` semantics, as the OmniMoE code uses: the
batch variance that normalises is biased, the one stored in `running_var` is
unbiased (times T / (T - 1)), and momentum 0.1 weights the new batch. The
statistics are taken over the global token axis inside jit, so under data
parallelism XLA all-reduces them (PyTorch without SyncBatchNorm would not).
The running statistics are `nnx.BatchStat` state, updated only in training.
In training a token's normalisation depends on the whole batch (other
sequences, later positions, padding), as in the original; evaluation uses the
running statistics, so its outputs depend on the token alone.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.sharding import LOGICAL_AXES_KEY


class TokenBatchNorm(nnx.Module):

  def __init__(self, features: int, *, momentum: float = 0.1, eps: float = 1e-5):
    self.momentum, self.eps = momentum, eps
    axes = {LOGICAL_AXES_KEY: (None,)}
    self.running_mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32), **axes)
    self.running_var = nnx.BatchStat(jnp.ones((features,), jnp.float32), **axes)

  def __call__(self, a: jax.Array, *, train: bool) -> jax.Array:
    """a: [T, features] float32."""
    if not train:
      return (a - self.running_mean[...]) * jax.lax.rsqrt(self.running_var[...] + self.eps)
    num_tokens = a.shape[0]
    mean = jnp.mean(a, axis=0)
    var = jnp.mean(jnp.square(a - mean), axis=0)
    unbiased = var * (num_tokens / max(num_tokens - 1, 1))
    m = self.momentum
    self.running_mean[...] = jax.lax.stop_gradient(
        (1 - m) * self.running_mean[...] + m * mean)
    self.running_var[...] = jax.lax.stop_gradient((1 - m) * self.running_var[...] + m * unbiased)
    return (a - mean) * jax.lax.rsqrt(var + self.eps)
