"""PEER: Parameter Efficient Expert Retrieval (He, arXiv 2407.04202), the OmniMoE baseline.

Single-neuron experts found by product keys on a learned query, per head h:

    q = BN(x W_q^h) = [q1, q2]             [D] split in halves; BN optional (PEER
                                            batch-normalises the query)
    a = q1 K1^T,  b = q2 K2^T               [n] each, sub-keys K1, K2: [n, D/2]
    (s, idx) = top_k over the n x n grid of a_r + b_c     (product_router.py)
    g = softmax(s)                          over the k selected, per head
    y = SharedSwiGLU(x) + sum_h sum_j g_hj GELU(u_idx . x) v_idx

Sub-keys are shared by the heads, the experts by everything (as in PEER). The
shared SwiGLU is not in PEER; it is here so PEER and OmniMoE compare at equal
active parameters with the same dense backbone (set shared_ffn_dim = 0 for
plain PEER). Differences from OmniMoE: dot-product keys instead of two
projections with BatchNorm'd log-softmaxes, a softmax over the k selected
instead of unnormalised joint probabilities, GELU instead of SiLU, heads.
GELU is jax.nn.gelu's tanh approximation; PyTorch's F.gelu (the PEER reference
code's) is the exact erf form. They differ by under 5e-4 per activation.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.papers.omnimoe.batch_norm import TokenBatchNorm
from moejax.papers.omnimoe.atomic_layer import AtomicLayer, atomic_tables
from moejax.model.dense_ffn import optional_swiglu
from moejax.model.params import param
from moejax.papers.omnimoe.product_router import GRID_TOPK, grid_side


class PEER(AtomicLayer):

  activation = "gelu"

  def __init__(self, cfg, layer_index: int, rngs: nnx.Rngs):
    m, a = cfg.model, cfg.atomic
    del layer_index
    self.dtype = jnp.dtype(m.compute_dtype)
    self.num_experts, self.top_k = a.num_experts, a.top_k
    self.heads, self.router, self.path = a.peer_heads, a.router, a.path
    side = grid_side(a.num_experts)
    qdim = a.peer_query_dim or m.d_model
    self.query = param(rngs, (m.d_model, self.heads * qdim), ("embed", None),
                       std=m.init_std, dtype=jnp.float32)
    self.query_norm = nnx.data(TokenBatchNorm(self.heads * qdim, momentum=a.bn_momentum,
                                              eps=a.bn_eps) if a.peer_query_batchnorm
                               else None)
    key_std = (qdim // 2) ** -0.5
    self.keys_x = param(rngs, (side, qdim // 2), (None, None), std=key_std, dtype=jnp.float32)
    self.keys_y = param(rngs, (side, qdim // 2), (None, None), std=key_std, dtype=jnp.float32)
    self.expert_in, self.expert_out = atomic_tables(
        rngs, a.num_experts, m.d_model, a.expert_init_std, jnp.dtype(m.param_dtype))
    self.shared = optional_swiglu(cfg, a.shared_ffn_dim, rngs)

  def route(self, tokens, *, train: bool):
    """tokens: [T, d] -> (gates [T, heads * k], expert ids [T, heads * k])."""
    num_tokens = tokens.shape[0]
    hi = jax.lax.Precision.HIGHEST
    q = jnp.dot(tokens.astype(jnp.float32), self.query[...], precision=hi)
    if self.query_norm is not None:
      q = self.query_norm(q, train=train)
    q = q.reshape(num_tokens * self.heads, -1)
    q1, q2 = jnp.split(q, 2, axis=-1)
    a = jnp.dot(q1, self.keys_x[...].T, precision=hi)
    b = jnp.dot(q2, self.keys_y[...].T, precision=hi)
    scores, idx = GRID_TOPK[self.router](a, b, self.top_k)
    gates = jax.nn.softmax(scores, axis=-1)
    return gates.reshape(num_tokens, -1), idx.reshape(num_tokens, -1)
