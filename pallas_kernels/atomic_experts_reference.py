"""Single-neuron ("atomic") experts: y_t = sum_{j<k} g_tj * act(u_e . x_t) * v_e, e = idx_tj.

N experts are two [N, d] tables, U (input vectors) and V (output vectors); a
token assembles a rank-k MLP from its k rows on the fly (OmniMoE eq. 6, PEER).
Three paths compute the same function, values and gradients:

  gather         token-centric: U[idx], V[idx] as [T, k, d], two einsums. The
                 reference, and the fastest on CPU at small k.
  expert_sorted  expert-centric (OmniMoE's "expert-centric scheduling"): the T*k
                 (token, slot) pairs are sorted by expert, so all pairs of one
                 expert are adjacent and read its U/V rows as one run; scores
                 are dot products of gathered token rows with those rows, and
                 the weighted V rows go back to their tokens. The table
                 gradients are scatter-adds over sorted ids (one write run per
                 expert); the token gathers use the inverse permutation in both
                 directions (row_gather.py), so no token-side scatter.
                 On an accelerator this is the order a fused kernel walks
                 (pallas_kernels/); in XLA it only changes memory access order.
  pallas         that fused kernel (pallas_kernels/atomic_experts.py): Triton on
                 GPU, interpret mode on CPU; on TPU it runs expert_sorted.

An expert id >= N means "no expert" (it contributes zero); expert parallelism
uses this for pairs whose expert lives on another shard.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.row_gather import dispatch_rows, gather_pairs

ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu}


def _rows(table, idx, *, sorted_ids=False):
  return table.at[idx].get(mode="fill", fill_value=0, indices_are_sorted=sorted_ids)


def atomic_gather(x, expert_idx, gates, up, down, *, activation: str = "silu", out_dtype=None):
  """x: [T, d]; expert_idx, gates: [T, k]; up, down: [N, d] -> y [T, d]
  (summed in float32, returned in out_dtype, default x.dtype)."""
  act = ACTIVATIONS[activation]
  u = _rows(up, expert_idx).astype(x.dtype)      # [T, k, d]
  v = _rows(down, expert_idx).astype(x.dtype)
  s = jnp.einsum("td,tkd->tk", x, u, preferred_element_type=jnp.float32)
  z = (act(s) * gates.astype(jnp.float32)).astype(x.dtype)
  y = jnp.einsum("tk,tkd->td", z, v, preferred_element_type=jnp.float32)
  return y.astype(out_dtype or x.dtype)


def atomic_expert_sorted(x, expert_idx, gates, up, down, *, activation: str = "silu",
                         out_dtype=None):
  """Same contract as atomic_gather, computed over pairs sorted by expert."""
  act = ACTIVATIONS[activation]
  num_tokens, k = expert_idx.shape
  flat = expert_idx.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)       # row -> pair
  inverse = jnp.zeros_like(order).at[order].set(
      jnp.arange(order.shape[0], dtype=jnp.int32))                 # pair -> row
  experts = flat[order]
  xs = dispatch_rows(x, order, inverse, k)                         # [T*k, d]
  u = _rows(up, experts, sorted_ids=True).astype(x.dtype)
  v = _rows(down, experts, sorted_ids=True).astype(x.dtype)
  s = jnp.einsum("rd,rd->r", xs, u, preferred_element_type=jnp.float32)
  g = gates.reshape(-1)[order].astype(jnp.float32)
  contrib = ((act(s) * g)[:, None] * v.astype(jnp.float32)).astype(x.dtype)
  per_pair = gather_pairs(contrib, inverse, order).reshape(num_tokens, k, -1)
  return jnp.sum(per_pair.astype(jnp.float32), axis=1).astype(out_dtype or x.dtype)


