"""MoHGE: Mixture of Heterogeneous Grouped Experts (Ma et al., arXiv 2604.23108).

    idx, w = route_groups(x)                           group_router.py
    y_t = sum_{j<k} w_tj SwiGLU_{idx_tj}(x_t) + SharedSwiGLU(x_t)

G groups of n SwiGLU experts; all experts of group g are W_g wide, and widths
differ between groups (the paper: 384 .. 1280 in steps of 128, mean 832, i.e.
0.81 of a homogeneous MoE of width 1024 at equal expert count). Each group is a
stack [n, d, W_g]. With the `sorted` backend all groups share one sorted
layout (one sort, one token gather) and each group's block loop visits only
its experts' blocks (dispatch/sorted_blocks.py); `ragged_dot` and expert
parallelism run once per group with only that group's pairs. Either way
compute follows the widths actually chosen, never the widest.
Under expert parallelism every group's stack is split over `expert` (n must be
a multiple of EP): shard s then holds the same share of every width, which is
the paper's all-size group-decoupling placement (mohge_placement.py).

Losses (mohge_balance.py): the size-weighted group loss (alpha_g, switched on
after `group_aux_start_fraction` of training, as the authors' global-step
switch) and the intra-group experts loss (alpha_e); no z-loss, no bias.

Deviations, on purpose: plain attention around it (MLA is orthogonal to the
claim); router init std is model.init_std (the paper: 0.008 for everything);
statistics over the global batch (Megatron's are per micro-batch).

aux metrics: active_params (router + shared + 3 d sum of the chosen widths, the
batch mean per token: routing decides it), routed_width (the sum of the k
chosen experts' widths, mean over tokens),
group_share/layer_NN ([G] share of pairs per group), expert_load/layer_NN ([E]
in the decoupled placement order), load_entropy, load_max_over_mean.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import dispatch, sharding
from moejax.dispatch.sorted_blocks import expert_rows_sorted_groups
from moejax.expert_parallel import expert_parallel_ffn
from moejax.model import load_balance as lb
from moejax.model import mohge_balance
from moejax.model.dense_ffn import SwiGLU
from moejax.model.group_router import route_groups
from moejax.model.params import param
from moejax.mohge_placement import expert_order


class ExpertGroup(nnx.Module):
  """n SwiGLU experts of one width: w_gate, w_up [n, d, W]; w_down [n, W, d]."""

  def __init__(self, num_experts: int, d_model: int, width: int, *, init_std: float,
               num_layers: int, param_dtype, rngs: nnx.Rngs):
    axes_in = ("expert", "embed", "expert_mlp")
    self.w_gate = param(rngs, (num_experts, d_model, width), axes_in, std=init_std,
                        dtype=param_dtype)
    self.w_up = param(rngs, (num_experts, d_model, width), axes_in, std=init_std,
                      dtype=param_dtype)
    self.w_down = param(rngs, (num_experts, width, d_model), ("expert", "expert_mlp", "embed"),
                        std=init_std / math.sqrt(2 * num_layers), dtype=param_dtype)


class MoHGE(nnx.Module):

  def __init__(self, cfg, layer_index: int, rngs: nnx.Rngs):
    m, h = cfg.model, cfg.mohge
    pd = jnp.dtype(m.param_dtype)
    self.layer_index = layer_index
    self.dtype = jnp.dtype(m.compute_dtype)
    self.widths = tuple(int(w) for w in h.group_widths)
    self.num_groups, self.per_group = len(self.widths), h.experts_per_group
    self.num_experts = self.num_groups * self.per_group
    self.top_groups, self.top_k, self.gate = h.top_groups, h.top_k, h.gate
    self.backend, self.block_size = h.backend, h.block_size
    self.group_coef, self.intra_coef = h.group_aux_coef, h.intra_aux_coef
    # floor(fraction * steps), robust to 0.29 * 100 = 28.999...
    self.group_aux_from_step = math.floor(h.group_aux_start_fraction * cfg.train.steps + 1e-9)
    self.width_interval = h.group_aux_width_interval
    self.d_model, self.shared_width = m.d_model, h.shared_ffn_dim
    self.group_router = param(rngs, (m.d_model, self.num_groups), ("embed", None),
                              std=m.init_std, dtype=jnp.float32)
    self.expert_router = param(rngs, (m.d_model, self.num_experts), ("embed", None),
                               std=m.init_std, dtype=jnp.float32)
    self.groups = nnx.List([
        ExpertGroup(self.per_group, m.d_model, w, init_std=m.init_std,
                    num_layers=m.num_layers, param_dtype=pd, rngs=rngs)
        for w in self.widths])
    self.shared = nnx.data(SwiGLU(
        m.d_model, h.shared_ffn_dim, init_std=m.init_std, num_layers=m.num_layers,
        rngs=rngs, compute_dtype=m.compute_dtype, param_dtype=m.param_dtype)
        if h.shared_ffn_dim > 0 else None)
    order = expert_order(self.num_groups, self.per_group, "decoupled")
    self._decoupled = tuple(g * self.per_group + j for g, j in order)  # static

  def __call__(self, x, *, token_ids=None, loop_index=None, step=None, train=False):
    del token_ids, loop_index
    batch, seq, d_model = x.shape
    x = x.astype(self.dtype)
    tokens = x.reshape(batch * seq, d_model)
    xf = tokens.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    group_logits = jnp.dot(xf, self.group_router[...], precision=hi)
    expert_logits = jnp.dot(xf, self.expert_router[...], precision=hi)
    routing = route_groups(group_logits, expert_logits, top_groups=self.top_groups,
                           top_k=self.top_k, gate=self.gate)
    y = self._routed(tokens, routing.expert_idx, routing.weights, train)
    y = y.reshape(batch, seq, d_model)
    if self.shared is not None:
      y = y + self.shared(x)[0]
    return y, self._aux(group_logits, routing, step, train)

  def _routed(self, tokens, expert_idx, weights, train):
    del train  # every backend used here is dropless
    mesh = sharding.active_mesh()
    expert_parallel = mesh is not None and mesh.shape["expert"] > 1
    n = self.per_group
    if self.backend == "sorted" and not expert_parallel:
      stacks = [(g.w_gate[...], g.w_up[...], g.w_down[...]) for g in self.groups]
      return expert_rows_sorted_groups(tokens, expert_idx, weights, stacks,
                                       block_size=self.block_size)
    y = jnp.zeros(tokens.shape, jnp.float32)
    for g, group in enumerate(self.groups):
      idx = jnp.where(expert_idx // n == g, expert_idx % n, n).astype(jnp.int32)
      args = (tokens, idx, weights, group.w_gate[...], group.w_up[...], group.w_down[...])
      if expert_parallel:
        out, _ = expert_parallel_ffn(*args, mesh=mesh, local_backend=self.backend,
                                     block_size=self.block_size, ep_capacity_factor=0.0)
      else:
        out, _ = dispatch.expert_ffn(self.backend, *args, block_size=self.block_size)
      y = y + out.astype(jnp.float32)
    return y.astype(tokens.dtype)

  def _aux(self, group_logits, routing, step, train):
    num_tokens = group_logits.shape[0]
    counts = lb.expert_counts(routing.expert_idx, self.num_experts)
    group_counts = counts.reshape(self.num_groups, self.per_group).sum(axis=1)
    widths = jnp.asarray(self.widths, jnp.float32)
    routed_width = jnp.sum(group_counts * widths) / num_tokens
    router_params = self.d_model * (self.num_groups + self.num_experts)
    aux = lb.health_metrics(counts, jnp.int32(0))
    del aux["dropped_fraction"]
    aux["routed_width"] = routed_width
    aux["active_params"] = (router_params + 3 * self.d_model * self.shared_width
                            + 3 * self.d_model * routed_width)
    tag = f"layer_{self.layer_index:02d}"
    aux[f"group_share/{tag}"] = group_counts / jnp.maximum(jnp.sum(group_counts), 1)
    aux[f"expert_load/{tag}"] = (counts / jnp.maximum(jnp.sum(counts), 1))[
        jnp.asarray(self._decoupled)]
    if self.intra_coef > 0:
      aux["loss/intra_group"] = self.intra_coef * mohge_balance.intra_group_loss(
          routing.expert_idx, routing.weights, num_experts=self.num_experts,
          num_groups=self.num_groups, top_groups=self.top_groups)
    if self.group_coef > 0:
      loss = mohge_balance.group_balance_loss(
          group_logits, routing.group_mask,
          mohge_balance.width_weights(self.widths, self.width_interval), self.top_groups)
      aux["group_balance"] = loss
      if train and step is not None:
        # Megatron: coeff if global_step > train_iters // 2 else 0 (1-based steps).
        on = jnp.asarray(step + 1 > self.group_aux_from_step, jnp.float32)
        aux["loss/group_balance"] = self.group_coef * on * loss
    return aux
