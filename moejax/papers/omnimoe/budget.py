"""Parameters and FLOPs of the OmniMoE and PEER sublayers (conventions: moejax/budget.py)."""

from moejax.model.sublayers import swiglu_budget


def omnimoe_budget(cfg, layer_index) -> dict:
  """Routed part: k dot products and k axpys of length d (4 k d FLOPs), no dispatch
  copies (expert rows are read, tokens stay); router: two [d, sqrt(N)] matmuls."""
  del layer_index
  a, d = cfg.atomic, cfg.model.d_model
  shared = swiglu_budget(d, a.shared_ffn_dim)
  router = 2 * d * int(round(a.num_experts ** 0.5))
  experts = 2 * a.num_experts * d
  active_experts = 2 * a.top_k * d
  return dict(params=router + experts + shared["params"],
              active_params=router + active_experts + shared["params"],
              flops_per_token=2 * router + 2 * active_experts + shared["flops_per_token"],
              router_flops_per_token=2 * router,
              expert_flops_per_token=2 * active_experts + shared["flops_per_token"])


def peer_budget(cfg, layer_index) -> dict:
  """Query projection, every sub-key (each token scores all 2 sqrt(N) of them per
  head), heads x k atomic experts, and the shared SwiGLU."""
  del layer_index
  a, d = cfg.atomic, cfg.model.d_model
  qdim = a.peer_query_dim or d
  shared = swiglu_budget(d, a.shared_ffn_dim)
  query = d * a.peer_heads * qdim
  keys = int(round(a.num_experts ** 0.5)) * qdim
  key_flops = 2 * a.peer_heads * keys
  active_experts = 2 * a.peer_heads * a.top_k * d
  return dict(params=query + keys + 2 * a.num_experts * d + shared["params"],
              active_params=query + keys + active_experts + shared["params"],
              flops_per_token=2 * query + key_flops + 2 * active_experts
              + shared["flops_per_token"],
              router_flops_per_token=2 * query + key_flops,
              expert_flops_per_token=2 * active_experts + shared["flops_per_token"])
