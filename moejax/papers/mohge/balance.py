"""MoHGE's two auxiliary losses (the authors' `moe_utils.py`), on the global batch.

Group-wise loss, size-weighted (steers tokens toward small, cheap groups):
    L_group = G / (T^2 K_g) * sum_g w_g P_g n_g
      P_g = sum_t softmax(x_t W_grp)_g   (a softmax, though routing uses sigmoid)
      n_g = tokens whose K_g chosen groups include g   (no gradient)
      w_g = (W_g - W_min + D) / D        D = width interval (1024 in the paper:
                                         widths 384..1280 give w = 1.0 .. 1.875)
    weighted by alpha_g = 1e-5, and only after the first half of training.
Intra-group experts loss:
    L_intra = E_eff / (T^2 k) * sum_e P_e n_e,   E_eff = E K_g / G
      P_e = sum_t w_te (the combine weights after top-k, 0 where not chosen)
      n_e = tokens routed to e   (no gradient)
    weighted by alpha_e = 5e-3.
"""

import jax
import jax.numpy as jnp


def width_weights(widths, interval: float = 0) -> jax.Array:
  """w_g = (W_g - W_min + D) / D; D = 0 picks W_max - W_min + (W_1 - W_0)."""
  w = jnp.asarray(widths, jnp.float32)
  if interval <= 0:
    step = float(widths[1] - widths[0]) if len(widths) > 1 else 1.0
    interval = float(max(widths) - min(widths)) + max(step, 1.0)
  return (w - jnp.min(w) + interval) / interval


def group_balance_loss(group_logits, group_mask, weights, top_groups: int) -> jax.Array:
  num_tokens, num_groups = group_logits.shape
  p = jnp.sum(jax.nn.softmax(group_logits.astype(jnp.float32), axis=-1), axis=0)
  n = jax.lax.stop_gradient(jnp.sum(group_mask, axis=0))
  return num_groups / (num_tokens ** 2 * top_groups) * jnp.sum(weights * p * n)


def intra_group_loss(expert_idx, combine_weights, *, num_experts: int, num_groups: int,
                     top_groups: int) -> jax.Array:
  num_tokens, top_k = expert_idx.shape
  flat = expert_idx.reshape(-1)
  p = jnp.zeros((num_experts,), jnp.float32).at[flat].add(
      combine_weights.reshape(-1).astype(jnp.float32))
  n = jax.lax.stop_gradient(jnp.zeros((num_experts,), jnp.float32).at[flat].add(1.0))
  effective = num_experts * top_groups / num_groups
  return effective / (num_tokens ** 2 * top_k) * jnp.sum(p * n)
