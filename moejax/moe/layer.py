"""Top-k Mixture-of-Experts FFN sublayer (Switch, GShard, Mixtral, DeepSeekMoE).

    (idx, w) = Router(x)                                  see router.py
    y_t = sum_{j<k} w_tj SwiGLU_{idx_tj}(x_t)  +  SharedSwiGLU(x_t)

E routed experts of width `expert_ffn_dim` each (many narrow ones = fine-grained
experts); `num_shared_experts` always-on experts are one dense SwiGLU of width
num_shared_experts * expert_ffn_dim (DeepSeekMoE). The routed part runs through
a dispatch backend (moejax/moe/dispatch), or, when the mesh has an `expert` axis
larger than one, through expert parallelism (moejax/moe/expert_parallel.py).

aux (see load_balance.py for the equations):
  loss/load_balance, loss/router_z   weighted auxiliary losses (global batch)
  load_entropy, load_max_over_mean, dropped_fraction, router_z   health scalars
  expert_load/layer_NN               per-expert share of the pairs, [E] vector
Training with bias_update_rate > 0 updates the router's RouterBias in place
(outside the optimizer; the train step saves it with the model state).
Evaluation (train=False) always dispatches without dropping.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.moe import dispatch
from moejax.moe.expert_parallel import expert_parallel_ffn
from moejax.model import load_balance as lb
from moejax.model.dense_ffn import optional_swiglu
from moejax.model.params import param, residual_depth
from moejax.moe.router import Router


class MoE(nnx.Module):

  def __init__(self, cfg, layer_index: int, rngs: nnx.Rngs):
    m, e = cfg.model, cfg.moe
    pd = jnp.dtype(m.param_dtype)
    self.layer_index = layer_index
    self.dtype = jnp.dtype(m.compute_dtype)
    self.num_experts, self.top_k = e.num_experts, e.top_k
    self.backend, self.block_size = dispatch.resolve_backend(e.backend), e.block_size
    self.capacity_factor, self.ep_capacity_factor = e.capacity_factor, e.ep_capacity_factor
    self.lb_coef, self.z_coef = e.load_balance_coef, e.z_loss_coef
    self.bias_rate = e.bias_update_rate
    self.router = Router(m.d_model, e.num_experts, top_k=e.top_k, score_fn=e.score_fn,
                         renormalize=e.renormalize,
                         routed_scaling_factor=e.routed_scaling_factor,
                         use_bias=e.bias_update_rate > 0, init_std=m.init_std, rngs=rngs)
    shape_in = (e.num_experts, m.d_model, e.expert_ffn_dim)
    axes_in = ("expert", "embed", "expert_mlp")
    self.w_gate = param(rngs, shape_in, axes_in, std=m.init_std, dtype=pd)
    self.w_up = param(rngs, shape_in, axes_in, std=m.init_std, dtype=pd)
    self.w_down = param(rngs, (e.num_experts, e.expert_ffn_dim, m.d_model),
                        ("expert", "expert_mlp", "embed"),
                        std=m.init_std / math.sqrt(2 * residual_depth(cfg)), dtype=pd)
    self.shared = optional_swiglu(cfg, e.num_shared_experts * e.expert_ffn_dim, rngs)

  def __call__(self, x, *, token_ids=None, loop_index=None, step=None, train=False):
    del token_ids, loop_index, step  # part of the interface; unused by top-k routing
    batch, seq, d_model = x.shape
    x = x.astype(self.dtype)
    tokens = x.reshape(batch * seq, d_model)
    with jax.named_scope("route"):
      routing = self.router(tokens)
    y, dropped = self._routed(tokens, routing.expert_idx, routing.weights, train)
    y = y.reshape(batch, seq, d_model)
    if self.shared is not None:
      y = y + self.shared(x)[0]

    counts = lb.expert_counts(routing.expert_idx, self.num_experts)
    aux = lb.health_metrics(counts, dropped)
    aux["router_z"] = lb.z_loss(routing.logits)
    aux[f"expert_load/layer_{self.layer_index:02d}"] = counts / jnp.maximum(jnp.sum(counts), 1)
    if self.lb_coef > 0:
      aux["loss/load_balance"] = self.lb_coef * lb.load_balance_loss(
          routing.probs, counts, self.top_k)
    if self.z_coef > 0:
      aux["loss/router_z"] = self.z_coef * aux["router_z"]
    if train and self.router.bias is not None:
      self.router.bias[...] = lb.updated_bias(self.router.bias[...], counts, self.bias_rate)
    return y, aux

  def _routed(self, tokens, expert_idx, weights, train):
    backend = self.backend
    if not train and backend not in dispatch.DROPLESS:
      backend = "sorted"  # evaluation never drops tokens
    mesh = sharding.active_mesh()
    if mesh is not None and mesh.shape["expert"] > 1:
      local = backend if backend in dispatch.DROPLESS else "sorted"
      return expert_parallel_ffn(
          tokens, expert_idx, weights, self.w_gate[...], self.w_up[...], self.w_down[...],
          mesh=mesh, local_backend=local, block_size=self.block_size,
          ep_capacity_factor=self.ep_capacity_factor if train else 0.0)
    return dispatch.expert_ffn(backend, tokens, expert_idx, weights, self.w_gate[...],
                               self.w_up[...], self.w_down[...], block_size=self.block_size,
                               capacity_factor=self.capacity_factor)
