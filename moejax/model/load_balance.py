"""Load-balancing losses, the aux-loss-free bias update, and router health metrics.

All statistics are over the *global* batch: the MoE layer computes them on the
logically unsharded [T, E] arrays inside jit, so the sums over tokens become
all-reduces over every data/fsdp/expert shard (never a per-shard mean, which
is what MaxText does and Qwen's "Demons in the Detail" shows hurts).

  load-balance loss (Switch, normalised as DeepSeek so uniform routing gives 1):
      L_lb = (E / (k T)) * sum_e c_e * P_e,   c_e = pairs routed to e,
                                              P_e = mean_t p_te (normalised scores)
  router z-loss (ST-MoE):  L_z = mean_t (logsumexp_e logits_te)^2
  aux-loss-free bias (DeepSeek-V3, arXiv 2408.15664), once per train step:
      b_e <- b_e + rate * sign(mean(c) - c_e),  then b <- b - mean(b)
      (centring changes no top-k choice; it keeps b bounded).
"""

import jax
import jax.numpy as jnp


def expert_counts(expert_idx: jax.Array, num_experts: int) -> jax.Array:
  """Pairs routed to each expert, [E] float32 (no gradient)."""
  flat = expert_idx.reshape(-1)
  return jnp.zeros((num_experts,), jnp.float32).at[flat].add(1.0, mode="drop")


def load_balance_loss(probs: jax.Array, counts: jax.Array, top_k: int) -> jax.Array:
  num_tokens, num_experts = probs.shape
  mean_prob = jnp.mean(probs, axis=0)
  return num_experts / (top_k * num_tokens) * jnp.sum(jax.lax.stop_gradient(counts) * mean_prob)


def z_loss(logits: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def updated_bias(bias: jax.Array, counts: jax.Array, rate: float) -> jax.Array:
  # sign(mean - c_e) as sign(sum - E c_e): exact for integer counts, so an
  # expert exactly at the mean is not pushed by a rounding error of the mean.
  b = bias + rate * jnp.sign(jnp.sum(counts) - counts.shape[0] * counts)
  return jax.lax.stop_gradient(b - jnp.mean(b))


def health_metrics(counts: jax.Array, dropped_pairs: jax.Array) -> dict:
  """Scalars: normalised load entropy (1 = uniform), max/mean load, dropped fraction."""
  total = jnp.maximum(jnp.sum(counts), 1.0)
  load = counts / total
  entropy = -jnp.sum(jnp.where(load > 0, load * jnp.log(jnp.maximum(load, 1e-30)), 0.0))
  num_experts = counts.shape[0]
  return {
      "load_entropy": entropy / jnp.log(jnp.float32(max(num_experts, 2))),
      "load_max_over_mean": jnp.max(counts) / jnp.maximum(jnp.mean(counts), 1e-9),
      "dropped_fraction": dropped_pairs.astype(jnp.float32) / total,
  }
