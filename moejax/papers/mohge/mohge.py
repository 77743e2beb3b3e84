"""MoHGE: Mixture of Heterogeneous Grouped Experts (Ma et al., arXiv 2604.23108).

    idx, w = route_groups(x)                           group_router.py
    y_t = sum_{j<k} w_tj SwiGLU_{idx_tj}(x_t) + SharedSwiGLU(x_t)

G groups of n SwiGLU experts; all experts of group g are W_g wide, and widths
differ between groups (the paper: 384 .. 1280 in steps of 128, mean 832, i.e.
0.81 of a homogeneous MoE of width 1024 at equal expert count). Each group is a
stack [n, d, W_g]. With the `sorted` backend all groups share one sorted
layout (one sort, one token gather) and each group's block loop visits only
its experts' blocks (dispatch/sorted_blocks.py); `ragged_dot` runs once per
group with only that group's pairs. Either way compute follows the widths
actually chosen, never the widest. Under expert parallelism every group's
stack is split over `expert` (n must be a multiple of EP), so shard s holds the
same share of every width, which is the paper's all-size group-decoupling
placement (placement.py); one all-to-all carries all groups' pairs.

Losses (mohge_balance.py): the size-weighted group loss (alpha_g, switched on
after `group_aux_start_fraction` of training, as the authors' global-step
switch) and the intra-group experts loss (alpha_e); no z-loss, no bias.

Deviations, on purpose: plain attention around it (MLA is orthogonal to the
claim); every weight (routers, experts, shared) starts at N(0, model.init_std)
(the paper: 0.008 for everything); statistics over the global batch
(Megatron's are per micro-batch).

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

from moejax import sharding
from moejax.moe import dispatch
from moejax.moe.dispatch.sorted_blocks import expert_rows_sorted_groups
from moejax.moe.expert_parallel import SWIGLU_SPECS, exchange_ffn
from moejax.model import load_balance as lb
from moejax.papers.mohge import balance as mohge_balance
from moejax.model.dense_ffn import optional_swiglu
from moejax.papers.mohge.group_router import route_groups
from moejax.model.params import param, residual_depth
from moejax.papers.mohge.placement import expert_order


def grouped_swiglu(backend: str, tokens, expert_idx, weights, stacks, *, block_size: int):
  """Experts of several widths; ids are group-major over `stacks` [(w_gate, w_up,
  w_down), ...], an id past the last expert means none. `sorted`: one shared
  layout; any other dropless backend: one call per group with its pairs only."""
  if backend == "sorted":
    return expert_rows_sorted_groups(tokens, expert_idx, weights, stacks,
                                     block_size=block_size)
  y, offset = jnp.zeros(tokens.shape, jnp.float32), 0
  for w_gate, w_up, w_down in stacks:
    n = w_gate.shape[0]
    inside = (expert_idx >= offset) & (expert_idx < offset + n)
    idx = jnp.where(inside, expert_idx - offset, n).astype(jnp.int32)
    out, _ = dispatch.expert_ffn(backend, tokens, idx, weights, w_gate, w_up, w_down,
                                 block_size=block_size)
    y, offset = y + out.astype(jnp.float32), offset + n
  return y.astype(tokens.dtype)


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
    self.backend, self.block_size = dispatch.resolve_backend(h.backend), h.block_size
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
                    num_layers=residual_depth(cfg), param_dtype=pd, rngs=rngs)
        for w in self.widths])
    self.shared = optional_swiglu(cfg, h.shared_ffn_dim, rngs)
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
    y = self._routed(tokens, routing.expert_idx, routing.weights)
    y = y.reshape(batch, seq, d_model)
    if self.shared is not None:
      y = y + self.shared(x)[0]
    return y, self._aux(group_logits, routing, step, train)

  def _routed(self, tokens, expert_idx, weights):
    """The routed experts' sum (every backend used here is dropless)."""
    mesh = sharding.active_mesh()
    stacks = [(g.w_gate[...], g.w_up[...], g.w_down[...]) for g in self.groups]
    if mesh is not None and mesh.shape["expert"] > 1:
      y, _ = self._expert_parallel(tokens, expert_idx, weights, stacks, mesh)
      return y
    return grouped_swiglu(self.backend, tokens, expert_idx, weights, stacks,
                          block_size=self.block_size)

  def _expert_parallel(self, tokens, expert_idx, weights, stacks, mesh):
    """One all-to-all for all groups: shard s holds experts j in [s m, (s+1) m) of
    every group (m = n / EP), numbered group-major among its G m local experts."""
    n, m = self.per_group, self.per_group // mesh.shape["expert"]

    def shard_and_local(e):
      g, j = e // n, e % n
      return j // m, g * m + j % m

    def local_ffn(rows, ids, local_stacks):
      triples = [tuple(local_stacks[3 * i:3 * i + 3]) for i in range(self.num_groups)]
      return grouped_swiglu(self.backend, rows, ids, jnp.ones(ids.shape, jnp.float32),
                            triples, block_size=self.block_size)

    flat = tuple(w for triple in stacks for w in triple)
    return exchange_ffn(tokens, expert_idx, weights, flat, SWIGLU_SPECS * self.num_groups,
                        num_experts=self.num_experts, mesh=mesh,
                        shard_and_local=shard_and_local, num_local=self.num_groups * m,
                        local_ffn=local_ffn, ep_capacity_factor=0.0,
                        check_vma=self.backend != "pallas")

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
