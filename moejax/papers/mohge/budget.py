"""Parameters and FLOPs of the MoHGE sublayer (conventions: moejax/budget.py)."""

from moejax.model.sublayers import swiglu_budget


def mohge_budget(cfg, layer_index) -> dict:
  """Active parameters depend on which groups tokens choose: this is the
  expectation under uniform routing (k experts of the mean width); training logs
  the batch mean as aux/active_params."""
  del layer_index
  h, d = cfg.mohge, cfg.model.d_model
  widths = tuple(h.group_widths)
  router = d * (len(widths) + len(widths) * h.experts_per_group)
  shared = swiglu_budget(d, h.shared_ffn_dim)
  experts = sum(3 * d * w * h.experts_per_group for w in widths)
  mean_active = h.top_k * 3 * d * sum(widths) / len(widths)
  expert_flops = 2 * mean_active + shared["flops_per_token"]
  dispatch_ops = 4 * h.top_k * d
  return dict(params=router + experts + shared["params"],
              active_params=int(router + mean_active + shared["params"]),
              flops_per_token=int(2 * router + expert_flops + dispatch_ops),
              router_flops_per_token=2 * router, expert_flops_per_token=int(expert_flops),
              dispatch_ops_per_token=dispatch_ops)
