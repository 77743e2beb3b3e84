"""What IterAdaLN adds to the model budget (conventions: moejax/budget.py)."""


def iter_adaln_budget(cfg) -> dict:
  """One IterAdaLN site (a pre-norm of a looped layer): the iteration MLP
  PE(k) -> a -> a runs once per iteration, not per token, so it costs
  parameters only; per token, W_h [d, a] and W_mod [a, m*d] (m = 3 with the
  output gate, else 2) are matmuls."""
  lp, d = cfg.loop, cfg.model.d_model
  a, pe = lp.adaln_dim, lp.adaln_pe_dim
  mods = 3 if lp.adaln_gate else 2
  per_token = d * a + a * mods * d
  params = pe * a + a + a * a + a + per_token + mods * d
  return dict(params=params, active_params=per_token, flops_per_token=2 * per_token)


def loop_budget(cfg) -> dict:
  """Every IterAdaLN site of the looped block: two per looped layer, each applied
  once per iteration. Empty without a loop or without IterAdaLN."""
  lp = cfg.loop
  if lp.block_layers == 0 or not lp.iter_adaln:
    return {}
  site = iter_adaln_budget(cfg)
  sites = 2 * lp.block_layers
  adaln = dict(params=sites * site["params"],
               active_params=sites * lp.iterations * site["active_params"],
               flops_per_token=sites * lp.iterations * site["flops_per_token"])
  return {**adaln, **{f"iter_adaln_{k}": v for k, v in adaln.items()}}
