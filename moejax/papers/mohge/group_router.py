"""MoHGE two-level routing: pick groups of experts, then experts inside them.

In float32, for T tokens, G groups of n experts each (E = G n), as in the
authors' Megatron patch (`GroupTopKRouter`, `TopKRouterForDiffenerentGroup`):

    group level:  s_g = sigmoid(x W_grp)                       [T, G]
                  m = top-K_g mask of s;  pi_g = m_g s_g / sum_{g'} m_g' s_g'
    expert level: q_{g,j} = softmax_j (x W_exp)_{g,j}  (within each group)
                  r_{g,j} = q_{g,j} pi_g;  r <- r / sum r       (0 outside chosen groups)
                  idx = top_k(r)
    weights, `gate` selects one of the two readings of the code (docs/papers/mohge.md §a):
      "megatron"      w = softmax over the k selected r values: Megatron's default
                      top-k with moe_router_pre_softmax=False, what the released
                      scripts run (close to uniform, since r lies in [0, 1])
      "renormalized"  w = r_idx / sum r_idx
Expert ids here are group-major, e = g n + j; placement.py has the
all-size decoupled order the paper uses to place experts on devices.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

GATES = ("megatron", "renormalized")


class GroupRouting(NamedTuple):
  group_mask: jax.Array    # [T, G] float32, 1 for the K_g chosen groups
  expert_idx: jax.Array    # [T, k] int32, group-major ids g * n + j
  weights: jax.Array       # [T, k] float32 combine weights


def route_groups(group_logits, expert_logits, *, top_groups: int, top_k: int,
                 gate: str) -> GroupRouting:
  """group_logits: [T, G]; expert_logits: [T, G * n] -> GroupRouting."""
  if gate not in GATES:
    raise ValueError(f"Unknown MoHGE gate {gate!r}; choose one of {GATES}.")
  num_tokens, num_groups = group_logits.shape
  scores = jax.nn.sigmoid(group_logits.astype(jnp.float32))
  _, top = jax.lax.top_k(scores, top_groups)
  mask = jnp.zeros_like(scores).at[jnp.arange(num_tokens)[:, None], top].set(1.0)
  pi = mask * scores
  pi = pi / jnp.sum(pi, axis=-1, keepdims=True)
  q = jax.nn.softmax(expert_logits.astype(jnp.float32).reshape(num_tokens, num_groups, -1),
                     axis=-1)
  r = (q * pi[:, :, None]).reshape(num_tokens, -1)
  # sum r = sum_g pi_g = 1 already; kept because the authors' code does it.
  r = r / jnp.sum(r, axis=-1, keepdims=True)
  selected, idx = jax.lax.top_k(r, top_k)
  if gate == "megatron":
    weights = jax.nn.softmax(selected, axis=-1)
  else:
    weights = selected / jnp.sum(selected, axis=-1, keepdims=True)
  return GroupRouting(mask, idx.astype(jnp.int32), weights)
