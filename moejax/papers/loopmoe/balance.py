"""Capacity balancing: size a LoopMoE's experts to match a Vanilla MoE's budget.

docs/papers/loopmoe.md leaves the paper's exact definition unknown; held fixed
here, all as moejax.budget.model_budget counts them (same vocabulary):
  * total parameters (a looped layer's weights count once),
  * forward FLOPs per token (a looped layer's count once per iteration),
  * rho = attention active params / FFN-sublayer active params, each summed
    over the layers a token passes through (IterAdaLN is on neither side).

The looped model keeps the vanilla effective depth (unique layers
L - (R - 1) * block_layers), attention dims, d_model, top_k and the shared-expert
count; only E' = moe.num_experts and F' = moe.expert_ffn_dim move.
Intuition (all L layers looped, L/R unique x R; attention params A, shared width
S): L (A + 3d(EF + S)) = (L/R) (A + 3d(E'F + S)) gives
  E' ~ R E + (R - 1) (A + 3 d S) / (3 d F),
and at F' = F the FLOPs and rho already match, since depth and widths are
unchanged. What the search settles exactly: the router (d E' params, 2 d E'
FLOPs) grows with E', so F' shrinks by ~(E' - E) / (3 (k + shared experts));
IterAdaLN's FLOPs can only be paid by a narrower F', which also lowers the FFN
active params and so raises rho: F' splits that cost between the FLOPs and rho
errors; E' moves in whole experts, a step in params that F' has to absorb too.
(E', F') is found by exhaustive search (F' in [F/2, 2F]), pure arithmetic.
"""

import math

from moejax import budget as budget_lib
from moejax.errors import ConfigError

QUANTITIES = ("params", "forward_flops_per_token", "attn_ffn_active_ratio")
_NAMES = {"params": "params", "forward_flops_per_token": "FLOPs/token",
          "attn_ffn_active_ratio": "attention/FFN active ratio"}
# What model_budget gives that the three quantities are built from.
_FIT_KEYS = ("params", "forward_flops_per_token", "attention_active_params",
             "ffn_active_params")


def _check_inputs(v, prefix, block, iterations, tolerance, multiple):
  m = v.model
  if m.sublayer != "moe":
    raise ConfigError(
        f"balance_loop needs a Vanilla MoE config but got model.sublayer="
        f"{m.sublayer!r}; start from a configs/moe.py preset.")
  if v.loop.block_layers != 0:
    raise ConfigError(
        f"balance_loop needs a non-looped reference but its loop.block_layers="
        f"{v.loop.block_layers}; set loop.block_layers=0 in the vanilla config.")
  if len(v.l3.after_layers):
    raise ConfigError("balance_loop does not place L3 layers in a loop plan; clear "
                      "l3.after_layers in the vanilla config.")
  if prefix < 0 or block < 1 or iterations < 2:
    raise ConfigError(
        f"A loop plan needs prefix_layers >= 0, block_layers >= 1 and iterations >= 2 "
        f"(got {prefix}, {block}, {iterations}); change the plan.")
  if prefix + block * iterations > m.num_layers:
    raise ConfigError(
        f"The loop plan prefix {prefix} + block {block} x {iterations} runs "
        f"{prefix + block * iterations} layers, deeper than the vanilla's "
        f"{m.num_layers}; use fewer iterations or a smaller block or prefix so that "
        f"prefix + block x iterations <= {m.num_layers}.")
  if v.moe.first_dense_layers > prefix:
    raise ConfigError(
        f"moe.first_dense_layers={v.moe.first_dense_layers} would put a dense layer "
        f"inside the loop; use prefix_layers >= {v.moe.first_dense_layers}.")
  if multiple < 1:
    raise ConfigError(f"experts_multiple_of must be >= 1 (got {multiple}).")
  if tolerance < 0:
    raise ConfigError(f"tolerance must be >= 0 (got {tolerance}).")


def _quantities(b: dict) -> dict:
  return {q: b[q] for q in QUANTITIES}


def _fit(cfg, vocab_size, e0, f0):
  """model_budget's values are bilinear in (E', F'): q = a + b E + c F + e E F.
  Four unit-step probes give the integer coefficients exactly; a fifth, far
  away, checks the form still holds (a budget change that breaks it must fail
  loudly, not mis-size the experts)."""
  def probe(e, f):
    cfg.moe.num_experts, cfg.moe.expert_ffn_dim = e, f
    b = budget_lib.model_budget(cfg, vocab_size)
    return [b[k] for k in _FIT_KEYS]
  q00, q10, q01, q11 = probe(e0, f0), probe(e0 + 1, f0), probe(e0, f0 + 1), probe(e0 + 1, f0 + 1)
  coef = []
  for y00, y10, y01, y11 in zip(q00, q10, q01, q11):
    e = y11 - y10 - y01 + y00
    b = y10 - y00 - e * f0
    c = y01 - y00 - e * e0
    coef.append((y00 - b * e0 - c * f0 - e * e0 * f0, b, c, e))
  far = (3 * e0 + 7, 2 * f0 + 5)
  if probe(*far) != [_bilinear(k, *far) for k in coef]:
    raise RuntimeError("model_budget is no longer bilinear in (num_experts, "
                       "expert_ffn_dim); update moejax/papers/loopmoe/balance.py.")
  return dict(zip(_FIT_KEYS, coef))


def _bilinear(k, e, f):
  a, b, c, d = k
  return a + b * e + c * f + d * e * f


def _search(fit, target, e_min, multiple, f_range):
  """Every F' in f_range; for each, the E' multiples around the one that
  matches params. Minimises the largest relative error, then their sum, then
  (E', F'): deterministic."""
  p_t, fl_t, rho_t = (target[q] for q in QUANTITIES)
  best = None
  for f in f_range:
    a, b, c, d = fit["params"]
    slope = b + d * f
    e_star = (p_t - a - c * f) / slope if slope > 0 else e_min
    base = max(e_min, multiple * math.floor(e_star / multiple))
    for e in sorted({max(e_min, base + j * multiple) for j in (-1, 0, 1, 2)}):
      attn = _bilinear(fit["attention_active_params"], e, f)
      ffn = _bilinear(fit["ffn_active_params"], e, f)
      errs = ((_bilinear(fit["params"], e, f) - p_t) / p_t,
              (_bilinear(fit["forward_flops_per_token"], e, f) - fl_t) / fl_t,
              (attn / max(ffn, 1) - rho_t) / rho_t)
      key = (max(map(abs, errs)), sum(map(abs, errs)), e, f)
      if best is None or key < best:
        best = key
  return best[2], best[3]


def balance_loop(vanilla_cfg, *, prefix_layers: int, block_layers: int, iterations: int,
                 iter_adaln: bool = True, vocab_size: int, tolerance: float = 0.01,
                 experts_multiple_of: int = 1):
  """(looped_cfg, report): a copy of `vanilla_cfg` with the loop plan set,
  num_layers = unique layers, and (E', F') chosen so params, FLOPs/token and
  rho match within `tolerance` (ConfigError otherwise). The other loop fields
  (adaln_dim, adaln_pe_dim, adaln_gate, remat) are those of vanilla_cfg.loop."""
  v = vanilla_cfg
  _check_inputs(v, prefix_layers, block_layers, iterations, tolerance, experts_multiple_of)
  depth = v.model.num_layers
  unique = depth - (iterations - 1) * block_layers
  c = v.copy_and_resolve_references()
  suffix = unique - prefix_layers - block_layers
  c.name = f"{v.name}_loop{prefix_layers}+{block_layers}x{iterations}+{suffix}" + (
      "" if iter_adaln else "_base")
  c.model.num_layers = unique
  c.loop.prefix_layers = prefix_layers
  c.loop.block_layers = block_layers
  c.loop.iterations = iterations
  c.loop.iter_adaln = iter_adaln

  vb = budget_lib.model_budget(v, vocab_size)
  target = _quantities(vb)
  e0, f0, k = v.moe.num_experts, v.moe.expert_ffn_dim, v.moe.top_k
  fit = _fit(c, vocab_size, e0, f0)
  e_min = experts_multiple_of * math.ceil(max(k, 1) / experts_multiple_of)
  # F' within [F/2, 2F]: far narrower experts would let a huge router (d E'
  # active params) stand in for the FFN and still match the three numbers.
  f_range = range(max(1, (f0 + 1) // 2), 2 * f0 + 1)
  e_new, f_new = _search(fit, target, e_min, experts_multiple_of, f_range)
  c.moe.num_experts, c.moe.expert_ffn_dim = e_new, f_new

  lb = budget_lib.model_budget(c, vocab_size)
  assert lb["effective_layers"] == vb["effective_layers"] == depth
  looped = _quantities(lb)
  errors = {q: (looped[q] - target[q]) / target[q] for q in QUANTITIES}
  worst = max(QUANTITIES, key=lambda q: abs(errors[q]))
  a, b, cc, d = fit["params"]
  e_params = (target["params"] - a - cc * f0) / (b + d * f0)  # params-only E' at F' = F
  adaln_share = lb["ffn_breakdown"].get("iter_adaln_flops_per_token", 0) / target[
      "forward_flops_per_token"]
  errs_text = ", ".join(f"{_NAMES[q]} {errors[q]:+.2%}" for q in QUANTITIES)
  if abs(errors[worst]) > tolerance:
    step = (_bilinear(fit["params"], e_new + experts_multiple_of, f_new)
            - _bilinear(fit["params"], e_new, f_new)) / target["params"]
    if worst != "params" and iter_adaln and adaln_share > tolerance / 2:
      hint = (f"IterAdaLN costs {adaln_share:.2%} of the FLOPs/token and a narrower "
              f"F' pays it only by moving the ratio, so use a smaller loop.adaln_dim "
              f"(now {c.loop.adaln_dim}), fewer looped layers or a larger tolerance")
    else:
      hint = (f"one step of {experts_multiple_of} expert(s) moves params by {step:.2%}, "
              f"so use a smaller experts_multiple_of, more unique layers (a smaller "
              f"block or fewer iterations) or a larger tolerance")
    raise ConfigError(
        f"Capacity balancing misses the {tolerance:.2%} tolerance: the best E'={e_new}, "
        f"F'={f_new} is off by {errors[worst]:+.2%} in {_NAMES[worst]} ({errs_text}); "
        f"{hint}.")
  paid = "the router growth" + (
      f" and IterAdaLN's FLOPs ({adaln_share:.2%} of FLOPs/token)" if iter_adaln else "")
  explanation = (
      f"E'={e_new} (vanilla {e0}; params alone at F'={f0} need {e_params:.1f}) spends the "
      f"parameters freed by sharing {block_layers} layer(s) over {iterations} iterations, "
      f"and F'={f_new} (vanilla {f0}) pays {paid}, leaving {errs_text}.")
  report = dict(vanilla=target, looped=looped, errors=errors, max_error=abs(errors[worst]),
                num_experts=e_new, expert_ffn_dim=f_new, unique_layers=unique,
                effective_layers=depth, params_matching_experts=e_params,
                iter_adaln_flops_share=adaln_share, explanation=explanation)
  return c, report
