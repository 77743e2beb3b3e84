"""Naive MoHGE references written from docs/papers/mohge.md §a-§b (tests only).

Nothing here imports moejax. Every function loops over tokens (and over the
chosen experts) in numpy float64, so keep the shapes small.

Notation: G groups of n experts, E = G n, K_g groups and k experts per token.
Expert ids are group-major: expert e lives in group e // n at index e % n.

  route_ref          two-level routing of one batch: sigmoid group scores, top-K_g
                     groups, pi = selected scores renormalised; within-group
                     softmax q; r = q pi (0 outside the chosen groups), r /= sum r;
                     top-k of r; weights "megatron" = softmax over the k selected
                     r, "renormalized" = r_sel / sum r_sel
  layer_ref          y_t = sum_j w_tj SwiGLU_{e_tj}(x_t) + SharedSwiGLU(x_t)
  group_loss_ref     G / (T^2 K_g) sum_g w_g P_g n_g
  width_weights_ref  w_g = (W_g - W_min + D) / D
  intra_loss_ref     E_eff / (T^2 k) sum_e P_e n_e,  E_eff = E K_g / G
  decoupled_group_of / decoupled_slot   the authors' closed form of the
                     all-size group-decoupling order
"""

import math

import numpy as np


def _sigmoid(v: float) -> float:
  return 1.0 / (1.0 + math.exp(-v))


def _softmax(values) -> list[float]:
  m = max(values)
  ex = [math.exp(v - m) for v in values]
  total = sum(ex)
  return [v / total for v in ex]


def route_token_ref(group_logits, expert_logits, *, top_groups: int, top_k: int,
                    gate: str):
  """One token. group_logits [G]; expert_logits [G n]. Returns a dict with
  groups (chosen, descending score), pi [G], r [E], experts (chosen, descending
  r), weights (aligned with experts), and the selection margins (smallest gap
  between a chosen and an unchosen score, at each level)."""
  z = [float(v) for v in group_logits]
  num_groups = len(z)
  num_experts = len(expert_logits)
  per_group = num_experts // num_groups
  s = [_sigmoid(v) for v in z]
  order = sorted(range(num_groups), key=lambda g: (-s[g], g))
  groups = order[:top_groups]
  chosen_total = sum(s[g] for g in groups)
  pi = [s[g] / chosen_total if g in groups else 0.0 for g in range(num_groups)]
  r = []
  for g in range(num_groups):
    q = _softmax([float(v) for v in expert_logits[g * per_group:(g + 1) * per_group]])
    r.extend(qj * pi[g] for qj in q)
  total = sum(r)
  r = [v / total for v in r]
  e_order = sorted(range(num_experts), key=lambda e: (-r[e], e))
  experts = e_order[:top_k]
  selected = [r[e] for e in experts]
  if gate == "megatron":
    weights = _softmax(selected)
  elif gate == "renormalized":
    weights = [v / sum(selected) for v in selected]
  else:
    raise ValueError(gate)
  group_margin = (s[order[top_groups - 1]] - s[order[top_groups]]
                  if top_groups < num_groups else math.inf)
  expert_margin = (r[e_order[top_k - 1]] - r[e_order[top_k]]
                   if top_k < num_experts else math.inf)
  return dict(groups=groups, pi=pi, r=r, experts=experts, weights=weights,
              group_margin=group_margin, expert_margin=expert_margin)


def route_ref(group_logits, expert_logits, *, top_groups: int, top_k: int, gate: str):
  """All tokens. Returns (group_mask [T, G], expert_idx [T, k], weights [T, k],
  margin): float64 arrays (ids int64), margin the smallest selection gap seen."""
  group_logits = np.asarray(group_logits, np.float64)
  expert_logits = np.asarray(expert_logits, np.float64)
  num_tokens, num_groups = group_logits.shape
  mask = np.zeros((num_tokens, num_groups))
  idx = np.zeros((num_tokens, top_k), np.int64)
  weights = np.zeros((num_tokens, top_k))
  margin = math.inf
  for t in range(num_tokens):
    out = route_token_ref(group_logits[t], expert_logits[t], top_groups=top_groups,
                          top_k=top_k, gate=gate)
    for g in out["groups"]:
      mask[t, g] = 1.0
    idx[t] = out["experts"]
    weights[t] = out["weights"]
    margin = min(margin, out["group_margin"], out["expert_margin"])
  return mask, idx, weights, margin


def swiglu_vec_ref(x, w_gate, w_up, w_down):
  """One token x [d]: (SiLU(x Wg) * (x Wu)) Wd, float64."""
  x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
  a = x @ wg
  h = a / (1.0 + np.exp(-a)) * (x @ wu)
  return h @ wd


def layer_ref(x, expert_idx, weights, groups, shared=None):
  """x [T, d]; expert_idx / weights [T, k] (group-major ids); groups: a list of
  (w_gate [n, d, W_g], w_up [n, d, W_g], w_down [n, W_g, d]) per group;
  shared: None or (w_gate [d, S], w_up [d, S], w_down [S, d]). Returns [T, d]."""
  x = np.asarray(x, np.float64)
  per_group = np.asarray(groups[0][0]).shape[0]
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    acc = np.zeros(x.shape[1])
    for j in range(np.asarray(expert_idx).shape[1]):
      e = int(expert_idx[t][j])
      g, i = e // per_group, e % per_group
      wg, wu, wd = groups[g]
      acc += float(weights[t][j]) * swiglu_vec_ref(x[t], wg[i], wu[i], wd[i])
    if shared is not None:
      acc += swiglu_vec_ref(x[t], *shared)
    out[t] = acc
  return out


def width_weights_ref(widths, interval: float):
  """w_g = (W_g - W_min + D) / D."""
  w_min = min(widths)
  return [(w - w_min + interval) / interval for w in widths]


def group_loss_ref(group_logits, group_mask, width_weights, top_groups: int) -> float:
  """G / (T^2 K_g) sum_g w_g P_g n_g; P_g = sum_t softmax(z_t)_g, n_g = tokens
  whose chosen groups include g."""
  group_logits = np.asarray(group_logits, np.float64)
  num_tokens, num_groups = group_logits.shape
  p = [0.0] * num_groups
  n = [0.0] * num_groups
  for t in range(num_tokens):
    probs = _softmax([float(v) for v in group_logits[t]])
    for g in range(num_groups):
      p[g] += probs[g]
      n[g] += float(group_mask[t][g] > 0)
  total = sum(width_weights[g] * p[g] * n[g] for g in range(num_groups))
  return num_groups / (num_tokens ** 2 * top_groups) * total


def intra_loss_ref(expert_idx, weights, *, num_experts: int, num_groups: int,
                   top_groups: int) -> float:
  """E_eff / (T^2 k) sum_e P_e n_e; P_e = sum_t w_te (final combine weights),
  n_e = tokens routed to e, E_eff = E K_g / G."""
  idx = np.asarray(expert_idx)
  num_tokens, top_k = idx.shape
  p = [0.0] * num_experts
  n = [0.0] * num_experts
  for t in range(num_tokens):
    for j in range(top_k):
      e = int(idx[t, j])
      p[e] += float(weights[t][j])
      n[e] += 1.0
  effective = num_experts * top_groups / num_groups
  return effective / (num_tokens ** 2 * top_k) * sum(p[e] * n[e] for e in range(num_experts))


def counts_ref(expert_idx, num_experts: int) -> np.ndarray:
  c = np.zeros(num_experts)
  for e in np.asarray(expert_idx).reshape(-1):
    c[int(e)] += 1
  return c


def decoupled_group_of(e: int, num_groups: int) -> int:
  """Group of position e in the authors' order (MySequentialMLP's closed form):
  (G + ((e mod G + 1) // 2) * (-1)^(e mod 2)) mod G."""
  p = e % num_groups
  return (num_groups + ((p + 1) // 2) * (-1) ** (e % 2)) % num_groups


def decoupled_slot(e: int, num_groups: int) -> tuple[int, int]:
  """(group, index inside the group) of position e: index = e // G."""
  return decoupled_group_of(e, num_groups), e // num_groups


def decoupled_from_group_major(vec, num_groups: int) -> np.ndarray:
  """A group-major per-expert vector [G n] rearranged into positions 0..E-1 of
  the decoupled order, with the closed form."""
  vec = np.asarray(vec)
  per_group = len(vec) // num_groups
  out = []
  for e in range(len(vec)):
    g, i = decoupled_slot(e, num_groups)
    out.append(vec[g * per_group + i])
  return np.array(out)
