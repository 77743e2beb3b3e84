"""Top-k router: which experts each token visits and with what weight.

In float32, whatever the compute dtype:
    logits = x W_r                                  [T, E]
    s      = softmax(logits) or sigmoid(logits)     (score_fn)
    idx    = top_k(s + b)                           b: aux-loss-free bias, selection only
    w      = s[idx]; w /= sum(w) if renormalize;  w *= routed_scaling_factor

With softmax and renormalisation, w equals a softmax over the k selected logits
(Mixtral); softmax without renormalisation and k = 1 is Switch; sigmoid with
renormalisation, the bias and a scaling factor is DeepSeek-V3. The bias `b`
only changes which experts are chosen, never the weights (DeepSeek-V3 §2.1.2);
it is a `RouterBias` variable, not a parameter, so the optimizer never sees it
(its update lives in load_balance.py).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.params import param
from moejax.sharding import LOGICAL_AXES_KEY


class RouterBias(nnx.Variable):
  """Per-expert selection bias of aux-loss-free balancing (state, not a Param)."""


class Routing(NamedTuple):
  expert_idx: jax.Array  # [T, k] int32
  weights: jax.Array     # [T, k] float32 combine weights
  logits: jax.Array      # [T, E] float32
  probs: jax.Array       # [T, E] float32, scores normalised to sum to one per token


class Router(nnx.Module):

  def __init__(self, d_model: int, num_experts: int, *, top_k: int, score_fn: str,
               renormalize: bool, routed_scaling_factor: float, use_bias: bool,
               init_std: float, rngs: nnx.Rngs):
    self.num_experts, self.top_k = num_experts, top_k
    self.score_fn, self.renormalize = score_fn, renormalize
    self.routed_scaling_factor = routed_scaling_factor
    self.kernel = param(rngs, (d_model, num_experts), ("embed", None), std=init_std,
                        dtype=jnp.float32)
    self.bias = nnx.data(RouterBias(jnp.zeros((num_experts,), jnp.float32),
                                    **{LOGICAL_AXES_KEY: (None,)}) if use_bias else None)

  def __call__(self, x: jax.Array) -> Routing:
    """x: [T, d] -> Routing."""
    logits = jnp.dot(x.astype(jnp.float32), self.kernel[...],
                     precision=jax.lax.Precision.HIGHEST)
    return route(logits, top_k=self.top_k, score_fn=self.score_fn,
                 renormalize=self.renormalize,
                 routed_scaling_factor=self.routed_scaling_factor,
                 bias=None if self.bias is None else self.bias[...])


SCORE_FNS = ("softmax", "sigmoid")


def route(logits, *, top_k: int, score_fn: str, renormalize: bool,
          routed_scaling_factor: float, bias=None) -> Routing:
  """The routing equations of the module docstring, on float32 logits [T, E]."""
  logits = logits.astype(jnp.float32)
  if score_fn == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)
    probs = scores
  elif score_fn == "sigmoid":
    scores = jax.nn.sigmoid(logits)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  else:
    raise ValueError(f"Unknown router score_fn {score_fn!r}; use 'softmax' or 'sigmoid'.")
  select = scores if bias is None else scores + jax.lax.stop_gradient(bias)
  _, idx = jax.lax.top_k(select, top_k)
  weights = jnp.take_along_axis(scores, idx, axis=-1)
  if renormalize:
    weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-20)
  weights = weights * routed_scaling_factor
  return Routing(idx.astype(jnp.int32), weights, logits, probs)
