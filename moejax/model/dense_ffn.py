"""Dense SwiGLU feed-forward sublayer (Shazeer 2020), the baseline FFN.

  y = (SiLU(x W_gate) * (x W_up)) W_down

The matmuls run on tokens flattened to [B*S, d]. With the [B, S, d] input left
as it is, XLA:CPU writes the SiLU backward a second time in a transposed layout
for the weight-gradient dots: at 4,096 tokens the layer ran at 61% of a 2048^3
matmul's rate, flattened it runs at 97% (benchmarks/results/moe_layer_cpu.md).

Speaks the sublayer interface `y, aux = ffn(x, token_ids=, loop_index=, step=, train=)`;
a dense layer has no auxiliary losses or metrics, so aux is empty.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.params import param, residual_depth
from moejax.sharding import constrain


class SwiGLU(nnx.Module):

  def __init__(self, d_model: int, ffn_dim: int, *, init_std: float, num_layers: int,
               rngs: nnx.Rngs, compute_dtype="float32", param_dtype="float32"):
    pd = jnp.dtype(param_dtype)
    self.dtype = jnp.dtype(compute_dtype)
    self.w_gate = param(rngs, (d_model, ffn_dim), ("embed", "mlp"), std=init_std, dtype=pd)
    self.w_up = param(rngs, (d_model, ffn_dim), ("embed", "mlp"), std=init_std, dtype=pd)
    self.w_down = param(rngs, (ffn_dim, d_model), ("mlp", "embed"),
                        std=init_std / math.sqrt(2 * num_layers), dtype=pd)

  def __call__(self, x, *, token_ids=None, loop_index=None, step=None, train=False):
    del token_ids, loop_index, step, train  # part of the interface; unused by a dense FFN
    dt = self.dtype
    lead = x.shape[:-1]
    x = x.astype(dt).reshape(-1, x.shape[-1])
    h = jax.nn.silu(x @ self.w_gate[...].astype(dt)) * (x @ self.w_up[...].astype(dt))
    h = constrain(h, ("batch", "mlp"))
    y = h @ self.w_down[...].astype(dt)
    return y.reshape(*lead, y.shape[-1]), {}


def swiglu(cfg, width: int, rngs: nnx.Rngs) -> SwiGLU:
  """A SwiGLU of `width` with the model's dtypes and the depth-scaled output init."""
  m = cfg.model
  return SwiGLU(m.d_model, width, init_std=m.init_std, num_layers=residual_depth(cfg),
                rngs=rngs, compute_dtype=m.compute_dtype, param_dtype=m.param_dtype)


def optional_swiglu(cfg, width: int, rngs: nnx.Rngs):
  """The always-on shared SwiGLU beside routed experts, or None when width is 0."""
  return nnx.data(swiglu(cfg, width, rngs) if width > 0 else None)
