"""Naive OmniMoE / PEER references written straight from the equations (tests only).

Nothing here imports moejax: these are the independent computations that the
product-key router, the atomic expert paths and the OmniMoE / PEER layers are
checked against. They loop over tokens, grid cells and selected experts in
Python, so keep the shapes small.

OmniMoE (Shi et al., docs/papers/omnimoe.md §a), per token x, n = sqrt(N):
    a = BN(x W_x), b = BN(x W_y)         BatchNorm without affine over the tokens:
                                          biased batch variance, eps (train) or the
                                          running statistics (eval)
    la = log_softmax(a), lb = log_softmax(b)
    s_{r n + c} = la_r + lb_c            all N cells
    (s_sel, idx) = top-k of a full sort  best first
    g = exp(s_sel)                       NOT renormalised
    y = W_down(SiLU(W_gate x) * (W_up x)) + sum_j g_j SiLU(u_idx_j . x) v_idx_j
  running <- (1 - m) running + m * batch statistic, running_var with the
  UNBIASED batch variance (PyTorch BatchNorm1d).

PEER (He 2024), per token and head h:
    q = x W_q (optionally BN without affine over tokens), q_h = [q1, q2]
    a = q1 K1^T, b = q2 K2^T, top-k over the n x n sums a_r + b_c
    g = softmax over the k selected scores
    y = shared + sum_h sum_j g_hj GELU(u . x) v
  GELU: jax.nn.gelu defaults to the tanh approximation, which is what the
  library's "gelu" uses; both forms are here ("gelu" = tanh, "gelu_erf" = exact).

Every function works in numpy float64 when given numpy arrays (explicit loops
over tokens, grid cells and selected experts). omnimoe_ref and peer_ref also
accept jax arrays, provided the selection `select` (expert ids from a numpy
call) is given, since a sort of traced values cannot pick Python ints: the same
equations are then written with vectorised jnp ops (constant gathers by those
ids), so jax.grad works through them cheaply; the tests check that this form
gives the numpy loops' value.
"""

import math

import jax.numpy as jnp
import numpy as np


def _namespace(*arrays):
  """numpy when every array is a numpy array (float64 loops), else jax.numpy."""
  return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def f64(a):
  return np.asarray(a, np.float64)


# --------------------------------------------------------------------------- #
# Activations and their derivatives (scalars or arrays, numpy or jnp)
# --------------------------------------------------------------------------- #

_GELU_C = math.sqrt(2.0 / math.pi)


def _sigmoid(xp, s):
  return 1.0 / (1.0 + xp.exp(-s))


def silu(s, xp=np):
  return s * _sigmoid(xp, s)


def silu_grad(s):
  sg = 1.0 / (1.0 + np.exp(-s))
  return sg * (1.0 + s * (1.0 - sg))


def gelu_tanh(s, xp=np):
  return 0.5 * s * (1.0 + xp.tanh(_GELU_C * (s + 0.044715 * s ** 3)))


def gelu_tanh_grad(s):
  th = np.tanh(_GELU_C * (s + 0.044715 * s ** 3))
  return 0.5 * (1.0 + th) + 0.5 * s * (1.0 - th ** 2) * _GELU_C * (1.0 + 3 * 0.044715 * s ** 2)


def _phi_cdf(s):
  return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(s, np.float64) / math.sqrt(2.0)))


def gelu_erf(s, xp=np):
  assert xp is np, "exact GELU reference is numpy only"
  return s * _phi_cdf(s)


def gelu_erf_grad(s):
  return _phi_cdf(s) + s * np.exp(-0.5 * s ** 2) / math.sqrt(2.0 * math.pi)


ACTIVATIONS = {"silu": (silu, silu_grad), "gelu": (gelu_tanh, gelu_tanh_grad),
               "gelu_erf": (gelu_erf, gelu_erf_grad)}


# --------------------------------------------------------------------------- #
# Top-k over the sqrt(N) x sqrt(N) grid of sums
# --------------------------------------------------------------------------- #

def grid_topk_ref(a, b, k):
  """a, b: [T, n] -> (scores [T, k], ids [T, k], margin [T]), numpy float64.

  Every cell s[r * n + c] = a[r] + b[c] is written out, then fully sorted per
  token (descending). margin = s_(k) - s_(k+1), the gap at the selection
  boundary (inf when k = N): a float32 implementation may only disagree on the
  ids when it is ~1e-6 or less."""
  a, b = f64(a), f64(b)
  num_tokens, n = a.shape
  scores = np.zeros((num_tokens, k))
  ids = np.zeros((num_tokens, k), np.int64)
  margin = np.full((num_tokens,), np.inf)
  for t in range(num_tokens):
    cells = np.zeros((n * n,))
    for r in range(n):
      for c in range(n):
        cells[r * n + c] = a[t, r] + b[t, c]
    order = np.argsort(-cells, kind="stable")
    ids[t] = order[:k]
    scores[t] = cells[order[:k]]
    if k < n * n:
      margin[t] = cells[order[k - 1]] - cells[order[k]]
  return scores, ids, margin


def grid_topk_grads_ref(ids, n, dscores):
  """Gradient of sum(scores * dscores) wrt a and b: a selected cell r n + c sends
  its cotangent to a[r] and to b[c] (and nothing else gets any)."""
  ids, dscores = np.asarray(ids), f64(dscores)
  num_tokens, k = ids.shape
  da, db = np.zeros((num_tokens, n)), np.zeros((num_tokens, n))
  for t in range(num_tokens):
    for j in range(k):
      r, c = divmod(int(ids[t, j]), n)
      da[t, r] += dscores[t, j]
      db[t, c] += dscores[t, j]
  return da, db


# --------------------------------------------------------------------------- #
# Atomic experts: y_t = sum_j g_tj act(u_e . x_t) v_e, e = idx_tj, id >= N = none
# --------------------------------------------------------------------------- #

def atomic_ref(x, idx, gates, up, down, activation="silu"):
  """Explicit loop over tokens and slots; numpy float64."""
  act = ACTIVATIONS[activation][0]
  x, gates, up, down = f64(x), f64(gates), f64(up), f64(down)
  idx = np.asarray(idx)
  num_tokens, k = idx.shape
  num_experts = up.shape[0]
  y = np.zeros_like(x)
  for t in range(num_tokens):
    for j in range(k):
      e = int(idx[t, j])
      if e >= num_experts:
        continue  # "no expert"
      s = float(up[e] @ x[t])
      y[t] += gates[t, j] * act(s) * down[e]
  return y


def atomic_grads_ref(x, idx, gates, up, down, dy, activation="silu"):
  """Hand-written backward of sum(atomic_ref(...) * dy), pair by pair, float64.

  For a pair (t, j) with expert e: s = u_e . x_t, h = act(s), y_t += g h v_e:
      dg = h <v_e, dy_t>,  dv_e += g h dy_t,  ds = g <v_e, dy_t> act'(s),
      du_e += ds x_t,  dx_t += ds u_e.
  Returns (dx, dgates, dup, ddown)."""
  act, dact = ACTIVATIONS[activation]
  x, gates, up, down, dy = (f64(a) for a in (x, gates, up, down, dy))
  idx = np.asarray(idx)
  num_tokens, k = idx.shape
  num_experts = up.shape[0]
  dx, dg = np.zeros_like(x), np.zeros_like(gates)
  dup, ddown = np.zeros_like(up), np.zeros_like(down)
  for t in range(num_tokens):
    for j in range(k):
      e = int(idx[t, j])
      if e >= num_experts:
        continue
      s = float(up[e] @ x[t])
      h = float(act(s))
      vdy = float(down[e] @ dy[t])
      dg[t, j] = h * vdy
      ddown[e] += gates[t, j] * h * dy[t]
      ds = gates[t, j] * vdy * float(dact(s))
      dup[e] += ds * x[t]
      dx[t] += ds * up[e]
  return dx, dg, dup, ddown


# --------------------------------------------------------------------------- #
# BatchNorm without affine over tokens, shared SwiGLU, softmaxes
# --------------------------------------------------------------------------- #

def batch_norm_ref(a, eps, running=None):
  """a: [T, f]. Train (running=None): normalise with the batch mean and the
  BIASED batch variance; also returns (mean, unbiased variance) for the
  running update. Eval (running=(mean, var)): normalise with those."""
  xp = _namespace(a)
  if running is not None:
    mean, var = running
    return (a - mean) / xp.sqrt(var + eps), None
  num_tokens = a.shape[0]
  if xp is np:
    mean = sum(a[t] for t in range(num_tokens)) / num_tokens
    sq = sum((a[t] - mean) ** 2 for t in range(num_tokens))
  else:
    mean = xp.sum(a, axis=0) / num_tokens
    sq = xp.sum((a - mean) ** 2, axis=0)
  biased = sq / num_tokens
  unbiased = sq / (num_tokens - 1)
  return (a - mean) / xp.sqrt(biased + eps), (mean, unbiased)


def running_update_ref(running_mean, running_var, batch_mean, batch_unbiased_var, momentum):
  """PyTorch convention: running = (1 - m) running + m batch."""
  m = momentum
  return ((1 - m) * f64(running_mean) + m * f64(batch_mean),
          (1 - m) * f64(running_var) + m * f64(batch_unbiased_var))


def log_softmax_ref(v, xp=np):
  """Over the last axis."""
  top = xp.max(v, axis=-1, keepdims=True)
  return v - top - xp.log(xp.sum(xp.exp(v - top), axis=-1, keepdims=True))


def softmax_ref(v, xp=np):
  """Over the last axis."""
  e = xp.exp(v - xp.max(v, axis=-1, keepdims=True))
  return e / xp.sum(e, axis=-1, keepdims=True)


def swiglu_ref(x, w_gate, w_up, w_down):
  """x [T, d] -> (SiLU(x Wg) * (x Wu)) Wd."""
  xp = _namespace(x, w_gate, w_up, w_down)
  return (silu(x @ w_gate, xp) * (x @ w_up)) @ w_down


def _pairs(xp, x, idx, gates, up, down, activation):
  """sum_j g_tj act(u_e . x_t) v_e: atomic_ref's loop in numpy; with jnp the same
  sum vectorised over (t, j) with constant gathers, so jax.grad stays cheap."""
  if xp is np:
    return atomic_ref(x, idx, gates, up, down, activation)
  act = ACTIVATIONS[activation][0]
  idx = np.asarray(idx)
  u, v = up[idx], down[idx]                         # [T, k, d] (ids are numpy ints)
  s = xp.sum(u * x[:, None, :], axis=-1)            # [T, k]
  return xp.sum((gates * act(s, xp))[:, :, None] * v, axis=1)


# --------------------------------------------------------------------------- #
# OmniMoE
# --------------------------------------------------------------------------- #

def omnimoe_ref(x, p, *, top_k, eps=1e-5, running=None, select=None):
  """x [T, d]; p: dict router_x, router_y [d, n], expert_in, expert_out [N, d],
  and w_gate, w_up [d, W], w_down [W, d] (no shared branch if w_gate is None).

  running: None (train-mode BN) or dict mean_x, var_x, mean_y, var_y (eval).
  select: expert ids [T, k] to use instead of sorting (needed with jnp inputs).
  Returns (y [T, d], info dict: ids, gates, log_probs [T, N], margin, routed,
  and in train mode the batch mean / unbiased variance of both logits)."""
  xp = _namespace(x, *[v for v in p.values() if v is not None])
  n = p["router_x"].shape[1]
  num_tokens = x.shape[0]
  bn_x = bn_y = None
  if running is None:
    a, bn_x = batch_norm_ref(x @ p["router_x"], eps)
    b, bn_y = batch_norm_ref(x @ p["router_y"], eps)
  else:
    a, _ = batch_norm_ref(x @ p["router_x"], eps, (running["mean_x"], running["var_x"]))
    b, _ = batch_norm_ref(x @ p["router_y"], eps, (running["mean_y"], running["var_y"]))
  la, lb = log_softmax_ref(a, xp), log_softmax_ref(b, xp)   # per token, over n
  info = {}
  if select is None:
    assert xp is np, "pass select= (ids from a numpy call) with jax inputs"
    scores, ids, margin = grid_topk_ref(la, lb, top_k)
    info["margin"] = margin
    info["log_probs"] = (la[:, :, None] + lb[:, None, :]).reshape(num_tokens, n * n)
  else:
    ids = np.asarray(select)
  # Scores gathered from the two factors (differentiable), gates = exp, no renorm.
  rows, cols = ids // n, ids % n
  tok = np.arange(num_tokens)[:, None]
  gates = xp.exp(la[tok, rows] + lb[tok, cols])    # [T, k]
  routed = _pairs(xp, x, ids, gates, p["expert_in"], p["expert_out"], "silu")
  y = routed
  if p.get("w_gate") is not None:
    y = y + swiglu_ref(x, p["w_gate"], p["w_up"], p["w_down"])
  info.update(ids=ids, routed=routed, gates=gates)
  if bn_x is not None:
    info.update(mean_x=bn_x[0], var_x=bn_x[1], mean_y=bn_y[0], var_y=bn_y[1])
  return y, info


# --------------------------------------------------------------------------- #
# PEER
# --------------------------------------------------------------------------- #

def peer_ref(x, p, *, top_k, heads, query_bn, eps=1e-5, running=None, select=None,
             activation="gelu"):
  """x [T, d]; p: dict query [d, heads * D], keys_x, keys_y [n, D/2],
  expert_in, expert_out [N, d], w_gate, w_up, w_down (or None).

  running: None (train) or dict mean, var for the query BN (eval).
  select: ids [T, heads * k] (head-major per token) instead of sorting.
  Returns (y, info: ids [T, heads*k], gates [T, heads*k], margin [T*heads],
  and in train mode with query_bn the query's batch mean / unbiased var)."""
  xp = _namespace(x, *[v for v in p.values() if v is not None])
  num_tokens = x.shape[0]
  n = p["keys_x"].shape[0]
  q = x @ p["query"]
  info = {}
  if query_bn:
    q, stats = batch_norm_ref(q, eps, None if running is None
                              else (running["mean"], running["var"]))
    if stats is not None:
      info.update(mean=stats[0], var=stats[1])
  qdim = q.shape[1] // heads
  half = qdim // 2
  if select is None:
    assert xp is np, "pass select= (ids from a numpy call) with jax inputs"
    all_ids, margins, all_gates = [], [], []
    for t in range(num_tokens):
      tok_ids, tok_gates = [], []
      for h in range(heads):
        qh = q[t, h * qdim:(h + 1) * qdim]
        a = np.array([qh[:half] @ p["keys_x"][r] for r in range(n)])
        b = np.array([qh[half:] @ p["keys_y"][c] for c in range(n)])
        scores, sel, margin = grid_topk_ref(a[None], b[None], top_k)
        margins.append(margin[0])
        tok_gates.append(softmax_ref(scores[0]))
        tok_ids.append(sel[0])
      all_ids.append(np.concatenate(tok_ids))
      all_gates.append(np.concatenate(tok_gates))
    ids, gates = np.stack(all_ids), np.stack(all_gates)
    info["margin"] = np.asarray(margins)
  else:
    ids = np.asarray(select)                         # [T, heads * k], head-major
    qh = q.reshape(num_tokens, heads, qdim)
    a = xp.einsum("thd,rd->thr", qh[..., :half], p["keys_x"])   # [T, heads, n]
    b = xp.einsum("thd,cd->thc", qh[..., half:], p["keys_y"])
    sel = ids.reshape(num_tokens, heads, top_k)
    tok = np.arange(num_tokens)[:, None, None]
    head = np.arange(heads)[None, :, None]
    scores = a[tok, head, sel // n] + b[tok, head, sel % n]     # [T, heads, k]
    gates = softmax_ref(scores, xp).reshape(num_tokens, heads * top_k)
  routed = _pairs(xp, x, ids, gates, p["expert_in"], p["expert_out"], activation)
  y = routed
  if p.get("w_gate") is not None:
    y = y + swiglu_ref(x, p["w_gate"], p["w_up"], p["w_down"])
  info.update(ids=ids, gates=gates, routed=routed)
  return y, info


def ragged_ids(case: str, rng):
  """(num_tokens, num_experts, idx [T, k]) for a named ragged routing case
  (shared by the XLA paths' and the Pallas kernel's tests)."""
  if case == "random":          # T k = 39 pairs over 8 experts: repeats across tokens
    return 13, 8, rng.integers(0, 8, size=(13, 3))
  if case == "one_expert":      # every token, every slot: expert 5 (one long run)
    return 9, 8, np.full((9, 2), 5)
  if case == "same_set":        # every token picks the same three experts
    return 11, 16, np.tile(np.array([[1, 14, 6]]), (11, 1))
  if case == "sparse":          # 16 experts, only 3 used; no expert 0 or 15
    return 7, 16, rng.choice([2, 9, 11], size=(7, 2))
  if case == "no_expert":       # ids N, N + 3, 2 N and 10^6 mean "no expert"
    idx = rng.integers(0, 8, size=(10, 4))
    mask = rng.random(size=idx.shape) < 0.35
    idx[mask] = rng.choice([8, 11, 16, 10 ** 6], size=int(mask.sum()))
    idx[0] = 8                  # a token with no expert at all
    return 10, 8, idx
  if case == "all_none":
    return 5, 4, np.full((5, 2), 4)
  if case == "k1":
    return 7, 9, rng.integers(0, 9, size=(7, 1))
  if case == "dup_in_token":    # the same expert twice in a token (allowed)
    return 6, 4, np.array([[1, 1, 3], [0, 2, 0], [3, 3, 3], [2, 1, 0], [1, 2, 1], [0, 0, 0]])
  raise ValueError(case)
