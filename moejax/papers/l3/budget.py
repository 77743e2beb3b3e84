"""What L3 layers add to the model budget (conventions: moejax/budget.py)."""


def l3_budget(cfg) -> dict:
  """One L3 layer. Table rows count as parameters; per token, the rows it reads
  are active. That number depends on the allocation and the token; the budget
  counts the cap l3.max_rows_per_token (an upper bound, and what the padded path
  computes for every token). Per row: a score (2 d) and a weighted value sum (2 e)."""
  l3, d = cfg.l3, cfg.model.d_model
  e = d if l3.tie_kv else l3.emb_dim
  row_width = d if l3.tie_kv else d + e
  rows_read = l3.max_rows_per_token
  dense = e * l3.up_dim + (d + l3.up_dim) * d
  norms = d + 2 * l3.up_dim
  return dict(params=l3.rows * row_width + dense + norms,
              active_params=rows_read * row_width + dense + norms,
              flops_per_token=2 * rows_read * (d + e) + 2 * dense)


def l3_layers_budget(cfg) -> dict:
  """Every inserted L3 layer; empty when l3.after_layers is empty."""
  n = len(cfg.l3.after_layers)
  if n == 0:
    return {}
  one = l3_budget(cfg)
  total = {k: n * v for k, v in one.items()}
  return {**total, **{f"l3_{k}": v for k, v in total.items()}}
