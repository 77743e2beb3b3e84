"""Naive MoE references written straight from the equations (tests only).

Nothing here imports moejax: these are the independent computations the
dispatch backends, the router and the load-balancing code are checked against.
They loop over tokens and slots in Python, so keep the shapes small.

  per_token_moe       y_t = sum_j w_tj * (SiLU(x_t Wg[e]) * (x_t Wu[e])) Wd[e]
                      (jnp ops, so jax.grad works through it; id E = no expert)
  capacity_reference  the same with GShard capacity: C = ceil(cf * T * k / E),
                      priority slot-major then token order, pairs past C drop
  naive_route         softmax / sigmoid scores, top-k of (scores + bias), weights
                      from the unbiased scores, renormalised, scaled (numpy)
  load_balance_ref, z_loss_ref, updated_bias_ref, health_ref   (numpy, loops)
"""

import math

import jax.numpy as jnp
import numpy as np


# --------------------------------------------------------------------------- #
# Expert FFN
# --------------------------------------------------------------------------- #

def _namespace(*arrays):
  """numpy when every array is a numpy array (fast, float64), else jax.numpy."""
  return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def per_token_moe(x, expert_idx, combine_weights, w_gate, w_up, w_down):
  """x [T, d]; expert_idx [T, k] (concrete ints, E = no expert); combine_weights
  [T, k]; w_gate, w_up [E, d, f]; w_down [E, f, d]. Returns y [T, d].

  An explicit loop over tokens and slots. With jax arrays it is built from jnp
  ops, so it is differentiable wrt x, the weights and combine_weights
  (expert_idx must be concrete: numpy or a host array); with numpy arrays
  only, it runs in numpy."""
  xp = _namespace(x, combine_weights, w_gate, w_up, w_down)
  idx = np.asarray(expert_idx)
  num_tokens, k = idx.shape
  num_experts = w_gate.shape[0]
  rows = []
  for t in range(num_tokens):
    acc = xp.zeros((x.shape[1],), x.dtype)
    for j in range(k):
      e = int(idx[t, j])
      if e == num_experts:
        continue  # no expert: contributes nothing
      assert 0 <= e < num_experts, e
      xt = x[t]
      a = xt @ w_gate[e]
      h = a / (1.0 + xp.exp(-a)) * (xt @ w_up[e])  # SiLU(a) = a * sigmoid(a)
      acc = acc + combine_weights[t, j] * (h @ w_down[e])
    rows.append(acc)
  return xp.stack(rows)


def per_token_moe_grads(x, expert_idx, combine_weights, w_gate, w_up, w_down, dy):
  """Backprop of per_token_moe written out by hand, numpy float64, pair by pair.

  Returns the gradients of sum(y * dy) wrt (x, combine_weights, w_gate, w_up,
  w_down). For one pair (t, j) with expert e, a = x_t Wg, u = x_t Wu,
  h = SiLU(a) u, o = h Wd, y_t += w o:
      dw = <dy_t, o>,  do = w dy_t,  dWd += h^T do,  dh = do Wd^T,
      da = dh u SiLU'(a),  du = dh SiLU(a),  dWg += x_t^T da,  dWu += x_t^T du,
      dx_t += da Wg^T + du Wu^T,     SiLU'(a) = s (1 + a (1 - s)),  s = sigmoid(a)."""
  x, cw, wg, wu, wd, dy = (np.asarray(a, np.float64)
                           for a in (x, combine_weights, w_gate, w_up, w_down, dy))
  idx = np.asarray(expert_idx)
  num_tokens, k = idx.shape
  num_experts = wg.shape[0]
  dx, dcw = np.zeros_like(x), np.zeros_like(cw)
  dwg, dwu, dwd = np.zeros_like(wg), np.zeros_like(wu), np.zeros_like(wd)
  for t in range(num_tokens):
    for j in range(k):
      e = int(idx[t, j])
      if e == num_experts:
        continue
      xt = x[t]
      a, u = xt @ wg[e], xt @ wu[e]
      s = 1.0 / (1.0 + np.exp(-a))
      h = a * s * u
      o = h @ wd[e]
      dcw[t, j] += dy[t] @ o
      do = cw[t, j] * dy[t]
      dwd[e] += np.outer(h, do)
      dh = wd[e] @ do
      da = dh * u * s * (1.0 + a * (1.0 - s))
      du = dh * a * s
      dwg[e] += np.outer(xt, da)
      dwu[e] += np.outer(xt, du)
      dx[t] += wg[e] @ da + wu[e] @ du
  return dx, dcw, dwg, dwu, dwd


def capacity_ceiling(num_tokens: int, top_k: int, num_experts: int,
                     capacity_factor: float) -> int:
  """C = ceil(cf * T * k / E), at least 1."""
  return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_kept(expert_idx, num_experts: int, capacity_factor: float):
  """(kept [T, k] bool, dropped count): GShard priority, written as a loop.

  Priority: every token's slot-0 choice in token order, then every slot-1
  choice, ... A pair is kept iff fewer than C pairs of higher priority went to
  its expert. Pairs with id E have no expert: never kept, never counted."""
  idx = np.asarray(expert_idx)
  num_tokens, k = idx.shape
  cap = capacity_ceiling(num_tokens, k, num_experts, capacity_factor)
  taken = [0] * num_experts
  kept = np.zeros((num_tokens, k), bool)
  dropped = 0
  for j in range(k):
    for t in range(num_tokens):
      e = int(idx[t, j])
      if e == num_experts:
        continue
      if taken[e] < cap:
        kept[t, j] = True
      else:
        dropped += 1
      taken[e] += 1  # pairs that went to e, kept or not
  return kept, dropped


def capacity_reference(x, expert_idx, combine_weights, w_gate, w_up, w_down, *,
                       capacity_factor: float):
  """(y [T, d], dropped pairs): per_token_moe with dropped pairs contributing 0."""
  num_experts = w_gate.shape[0]
  idx = np.asarray(expert_idx)
  kept, dropped = capacity_kept(idx, num_experts, capacity_factor)
  idx_kept = np.where(kept, idx, num_experts)
  return per_token_moe(x, idx_kept, combine_weights, w_gate, w_up, w_down), dropped


def swiglu_ref(x, w_gate, w_up, w_down):
  """Dense SwiGLU, numpy float64: (SiLU(x Wg) * (x Wu)) Wd."""
  x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
  a = x @ w_gate
  return (a / (1.0 + np.exp(-a)) * (x @ w_up)) @ w_down


# --------------------------------------------------------------------------- #
# Routing
# --------------------------------------------------------------------------- #

def naive_route(logits, *, top_k: int, score_fn: str, renormalize: bool,
                routed_scaling_factor: float, bias=None):
  """numpy float64, one token at a time. Returns (idx [T, k], weights [T, k],
  probs [T, E]); idx in descending order of (score + bias)."""
  logits = np.asarray(logits, np.float64)
  num_tokens, num_experts = logits.shape
  b = np.zeros(num_experts) if bias is None else np.asarray(bias, np.float64)
  idx = np.zeros((num_tokens, top_k), np.int64)
  weights = np.zeros((num_tokens, top_k))
  probs = np.zeros((num_tokens, num_experts))
  for t in range(num_tokens):
    row = [float(v) for v in logits[t]]
    if score_fn == "softmax":
      m = max(row)
      ex = [math.exp(v - m) for v in row]
      scores = [v / sum(ex) for v in ex]
      p = list(scores)
    elif score_fn == "sigmoid":
      scores = [1.0 / (1.0 + math.exp(-v)) for v in row]
      p = [s / sum(scores) for s in scores]
    else:
      raise ValueError(score_fn)
    chosen = sorted(range(num_experts), key=lambda e: (-(scores[e] + b[e]), e))[:top_k]
    w = [scores[e] for e in chosen]  # the bias never enters the weights
    if renormalize:
      total = sum(w)
      w = [v / total for v in w]
    idx[t] = chosen
    weights[t] = [v * routed_scaling_factor for v in w]
    probs[t] = p
  return idx, weights, probs


def counts_ref(expert_idx, num_experts: int):
  """Pairs routed to each expert (ids equal to E are not counted)."""
  c = np.zeros(num_experts)
  for e in np.asarray(expert_idx).reshape(-1):
    if int(e) < num_experts:
      c[int(e)] += 1
  return c


def load_balance_ref(probs, expert_idx, top_k: int):
  """L = E / (k T) * sum_e c_e * P_e,  P_e = (1/T) sum_t p_te."""
  probs = np.asarray(probs, np.float64)
  num_tokens, num_experts = probs.shape
  c = counts_ref(expert_idx, num_experts)
  total = 0.0
  for e in range(num_experts):
    p_e = sum(probs[t, e] for t in range(num_tokens)) / num_tokens
    total += c[e] * p_e
  return num_experts / (top_k * num_tokens) * total


def z_loss_ref(logits):
  """mean_t (log sum_e exp(l_te))^2."""
  logits = np.asarray(logits, np.float64)
  vals = []
  for row in logits:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    vals.append(lse * lse)
  return sum(vals) / len(vals)


def updated_bias_ref(bias, counts, rate: float):
  """b_e + rate * sign(mean(c) - c_e), then centred."""
  bias = np.asarray(bias, np.float64)
  counts = np.asarray(counts, np.float64)
  mean = counts.mean()
  b = np.array([bias[e] + rate * np.sign(mean - counts[e]) for e in range(len(bias))])
  return b - b.mean()


def health_ref(counts, dropped: int):
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  ent = 0.0
  for c in counts:
    if c > 0:
      ent -= (c / total) * math.log(c / total)
  return {
      "load_entropy": ent / math.log(len(counts)),
      "load_max_over_mean": counts.max() / counts.mean(),
      "dropped_fraction": dropped / total,
  }



def route_layer(layer, cfg, x, bias=None):
  """naive_route on an MoE layer's own router weights, for tokens x [B, S, d]:
  -> (tokens [T, d], logits, expert ids, weights, probs), float64."""
  e = cfg.moe
  tokens = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  logits = tokens @ np.asarray(layer.router.kernel[...], np.float64)
  idx, weights, probs = naive_route(logits, top_k=e.top_k, score_fn=e.score_fn,
                                    renormalize=e.renormalize,
                                    routed_scaling_factor=e.routed_scaling_factor,
                                    bias=bias)
  return tokens, logits, idx, weights, probs
