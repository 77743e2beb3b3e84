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
Each FFN sublayer registers a budget function fn(cfg, layer_index) here under
its builder's name in moejax/model/sublayers.py; extra keys it returns are
summed over layers into the breakdown.
"""

from moejax import data as data_lib
from moejax.model.loop import layer_applications
from moejax.registry import Registry

# name -> fn(cfg, layer_index) -> dict(params=, active_params=, flops_per_token=, ...)
SUBLAYER_BUDGETS: Registry = Registry("sublayer budget")
register = SUBLAYER_BUDGETS.register


def swiglu_budget(d_model: int, width: int) -> dict:
  p = 3 * d_model * width
  return dict(params=p, active_params=p, flops_per_token=2 * p)


@register("dense")
def _dense_budget(cfg, layer_index) -> dict:
  del layer_index
  return swiglu_budget(cfg.model.d_model, cfg.model.ffn_dim)


@register("moe")
def _moe_budget(cfg, layer_index) -> dict:
  e, d = cfg.moe, cfg.model.d_model
  if layer_index < e.first_dense_layers:
    return _dense_budget(cfg, layer_index)
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


@register("omnimoe")
def _omnimoe_budget(cfg, layer_index) -> dict:
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


@register("peer")
def _peer_budget(cfg, layer_index) -> dict:
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


@register("mohge")
def _mohge_budget(cfg, layer_index) -> dict:
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


def attention_budget(cfg) -> dict:
  m = cfg.model
  proj = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
  scores = 4 * cfg.data.seq_len * m.num_heads * m.head_dim
  return dict(params=proj, active_params=proj, flops_per_token=2 * proj + scores)


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


def model_budget(cfg, vocab_size: int | None = None) -> dict:
  """Totals for the whole decoder; see the module docstring for conventions.

  A looped block's parameters count once and its active parameters and FLOPs
  once per iteration. attn_ffn_active_ratio = attention active parameters /
  FFN-sublayer active parameters, both summed over the layers a token passes
  through (IterAdaLN and L3 belong to neither side and are listed apart)."""
  m = cfg.model
  vocab = vocab_size or data_lib.vocab_size(cfg.data)
  fn = SUBLAYER_BUDGETS.get(m.sublayer)
  reps = layer_applications(cfg)
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
  if cfg.loop.block_layers > 0 and cfg.loop.iter_adaln:
    site = iter_adaln_budget(cfg)
    sites = 2 * cfg.loop.block_layers
    adaln = dict(params=sites * site["params"],
                 active_params=sites * cfg.loop.iterations * site["active_params"],
                 flops_per_token=sites * cfg.loop.iterations * site["flops_per_token"])
    breakdown.update({f"iter_adaln_{k}": v for k, v in adaln.items()})
    extra = {k: extra[k] + adaln[k] for k in extra}
  if len(cfg.l3.after_layers):
    one = l3_budget(cfg)
    n = len(cfg.l3.after_layers)
    breakdown.update({f"l3_{k}": n * v for k, v in one.items()})
    extra = {k: extra[k] + n * one[k] for k in extra}
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
