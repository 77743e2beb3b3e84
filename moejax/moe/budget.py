"""Parameters and FLOPs of the top-k MoE sublayer (conventions: moejax/budget.py)."""

from moejax.model.sublayers import DENSE, swiglu_budget


def moe_budget(cfg, layer_index) -> dict:
  e, d = cfg.moe, cfg.model.d_model
  if layer_index < e.first_dense_layers:
    return DENSE.budget(cfg, layer_index)
  expert = swiglu_budget(d, e.expert_ffn_dim)
  shared = swiglu_budget(d, e.num_shared_experts * e.expert_ffn_dim)
  router = d * e.num_experts
  router_flops = 2 * router
  expert_flops = (e.top_k * expert["flops_per_token"] + shared["flops_per_token"])
  dispatch_ops = 4 * e.top_k * d
  return dict(
      params=router + e.num_experts * expert["params"] + shared["params"],
      active_params=router + e.top_k * expert["params"] + shared["params"],
      flops_per_token=router_flops + expert_flops + dispatch_ops,
      router_flops_per_token=router_flops, expert_flops_per_token=expert_flops,
      dispatch_ops_per_token=dispatch_ops)
