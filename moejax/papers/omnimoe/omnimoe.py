"""OmniMoE: a shared SwiGLU plus top-k of N single-neuron experts (Shi et al., arXiv 2602.05711).

For a token x (n = sqrt(N), expert i = r n + c), as in the authors' `OmniMoE`:

    a = BN(x W_x),  b = BN(x W_y)          [n] each; BatchNorm without affine,
                                            over tokens (batch_norm.py)
    s_rc = log_softmax(a)_r + log_softmax(b)_c = log(p_r q_c)
    (s, idx) = top_k over the n x n grid   product_router.py: per-axis top-min(n, k)
                                            candidates, or the full-grid scan
    g = exp(s) = p_r q_c                    not renormalised over the k
    y = SharedSwiGLU(x) + sum_j g_j SiLU(u_idx_j . x) v_idx_j    atomic_experts.py

There is no auxiliary loss (the released code has none): the affine-free BN
keeps every row and column logit at zero mean and unit variance over the batch,
so no row or column can win every token. The gates sum to well below one at
init (about 0.27 for N = 256, k = 8), so the routed branch starts small next
to the shared one; keeping them unnormalised is part of the method.

Deviations, on purpose: the expert tables start at N(0, expert_init_std) with
the model's init_std (0.02) by default, not PyTorch's N(0, 1) Embedding
default (the paper's training framework, which may override it, is not
released; atomic.expert_init_std = 1.0 gives the code's default, and trained
clearly worse in our tiny run: README). The router projections and the shared
SwiGLU start at N(0, model.init_std), not PyTorch's Kaiming-uniform default.

aux metrics (no losses): load_entropy, load_max_over_mean (over all N),
dead_fraction (experts no token chose in this batch), gate_mass (mean sum of
the k gates), router_bn_mean_abs (mean |running mean| of the two BNs: drift).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.papers.omnimoe.atomic_layer import AtomicLayer, atomic_tables
from moejax.model.dense_ffn import optional_swiglu
from moejax.papers.omnimoe.batch_norm import TokenBatchNorm
from moejax.model.params import param
from moejax.papers.omnimoe.product_router import GRID_TOPK, grid_side


class OmniMoE(AtomicLayer):

  activation = "silu"

  def __init__(self, cfg, layer_index: int, rngs: nnx.Rngs):
    m, a = cfg.model, cfg.atomic
    del layer_index
    self.dtype = jnp.dtype(m.compute_dtype)
    self.num_experts, self.top_k = a.num_experts, a.top_k
    self.side = grid_side(a.num_experts)
    self.router, self.path = a.router, a.path
    self.router_x = param(rngs, (m.d_model, self.side), ("embed", None), std=m.init_std,
                          dtype=jnp.float32)
    self.router_y = param(rngs, (m.d_model, self.side), ("embed", None), std=m.init_std,
                          dtype=jnp.float32)
    self.norm_x = TokenBatchNorm(self.side, momentum=a.bn_momentum, eps=a.bn_eps)
    self.norm_y = TokenBatchNorm(self.side, momentum=a.bn_momentum, eps=a.bn_eps)
    self.expert_in, self.expert_out = atomic_tables(
        rngs, a.num_experts, m.d_model, a.expert_init_std, jnp.dtype(m.param_dtype))
    self.shared = optional_swiglu(cfg, a.shared_ffn_dim, rngs)

  def route(self, tokens, *, train: bool):
    """tokens: [T, d] -> (gates [T, k] float32, expert ids [T, k] int32)."""
    xf = tokens.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    log_px = jax.nn.log_softmax(
        self.norm_x(jnp.dot(xf, self.router_x[...], precision=hi), train=train), axis=-1)
    log_py = jax.nn.log_softmax(
        self.norm_y(jnp.dot(xf, self.router_y[...], precision=hi), train=train), axis=-1)
    scores, idx = GRID_TOPK[self.router](log_px, log_py, self.top_k)
    return jnp.exp(scores), idx

  def extra_metrics(self) -> dict:
    drift = 0.5 * (jnp.mean(jnp.abs(self.norm_x.running_mean[...]))
                   + jnp.mean(jnp.abs(self.norm_y.running_mean[...])))
    return {"router_bn_mean_abs": drift}
