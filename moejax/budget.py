"""Parameter and FLOP budgets from a config, without building the model.

Conventions (those of PaLM and MaxText, so MFU numbers compare):
  * a matmul of an [n, a] input with an [a, b] weight costs 2*a*b FLOPs per row;
  * attention scores and the weighted sum cost 2 * 2 * seq_len * heads * head_dim
    per token per layer, counted over the full square (no causal discount);
  * training FLOPs = 3 x forward (backward = 2 x forward);
  * embedding lookups are free; the unembedding is a matmul (tied or not);
  * "active" parameters are those one token's forward pass multiplies with
    (for a dense model, all but the input embedding when untied).
  * MoE: the router matmul (2*d*E) is counted, and so is moving data: each
    element a token's rows are gathered into (dispatch) and read back from
    (combine) counts one operation, and the weighted sum over k two, i.e.
    4*k*d per token. They are listed apart ("dispatch") so they can be excluded.
Each FFN sublayer brings a budget function fn(cfg, layer_index) with its
builder (moejax/model/sublayers.py); extra keys it returns are summed over
layers into the breakdown. An extension that adds to the layer plan (a
modulated loop, inserted layers) adds its cost with Extension.budget(cfg).
"""

from moejax import data as data_lib
from moejax import extensions
from moejax.model import layer_plan, sublayers

def attention_budget(cfg) -> dict:
  m = cfg.model
  proj = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
  scores = 4 * cfg.data.seq_len * m.num_heads * m.head_dim
  return dict(params=proj, active_params=proj, flops_per_token=2 * proj + scores)


def model_budget(cfg, vocab_size: int | None = None) -> dict:
  """Totals for the whole decoder; see the module docstring for conventions.

  A looped block's parameters count once and its active parameters and FLOPs
  once per iteration. attn_ffn_active_ratio = attention active parameters /
  FFN-sublayer active parameters, both summed over the layers a token passes
  through (what extensions add to the plan, e.g. iteration modulators or
  inserted lookup layers, belongs to neither side and is listed apart)."""
  m = cfg.model
  vocab = vocab_size or data_lib.vocab_size(cfg.data)
  fn = sublayers.get(m.sublayer).budget
  reps = layer_plan.build(cfg).applications()
  per_layer = [fn(cfg, i) for i in range(m.num_layers)]
  ffn = {k: sum(b.get(k, 0) * (r if k != "params" else 1) for b, r in zip(per_layer, reps))
         for b in per_layer for k in b}
  attn = attention_budget(cfg)
  depth = sum(reps)
  norms = (2 * m.num_layers + 1) * m.d_model
  embed = vocab * m.d_model
  unembed = 0 if m.tie_embeddings else vocab * m.d_model
  extra = dict(params=0, active_params=0, flops_per_token=0)
  breakdown = {}
  for ext in extensions.registered():
    if ext.budget is None:
      continue
    added = ext.budget(cfg)  # {} when the config does not use the extension
    breakdown.update({k: v for k, v in added.items() if k not in extra})
    extra = {k: extra[k] + added.get(k, 0) for k in extra}
  layers_params = m.num_layers * attn["params"] + ffn["params"] + extra["params"]
  attn_active = depth * attn["active_params"]
  layers_active = attn_active + ffn["active_params"] + extra["active_params"]
  total = embed + unembed + layers_params + norms
  # One token multiplies with the unembedding (which is the embedding when tied).
  active = layers_active + (2 * depth + 1) * m.d_model + vocab * m.d_model
  fwd = depth * attn["flops_per_token"] + ffn["flops_per_token"] + extra["flops_per_token"]
  fwd += 2 * vocab * m.d_model
  breakdown.update({k: v for k, v in ffn.items()
                    if k not in ("params", "active_params", "flops_per_token")})
  return dict(
      params=int(total),
      non_embedding_params=int(layers_params + norms),
      active_params=int(active),
      forward_flops_per_token=int(fwd),
      train_flops_per_token=int(3 * fwd),
      effective_layers=depth,
      attention_active_params=int(attn_active),
      ffn_active_params=int(ffn["active_params"]),
      attn_ffn_active_ratio=attn_active / max(ffn["active_params"], 1),
      ffn_breakdown={k: int(v) for k, v in breakdown.items()},
  )


def format_count(n: float) -> str:
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return f"{n:.0f}"
