"""Top-k over a sqrt(N) x sqrt(N) grid of experts whose score is a sum of two parts.

Expert i = r * n + c (n = sqrt(N)) scores s_i = a_r + b_c. The k best cells of
the grid always lie inside (top-k' rows) x (top-k' columns), k' = min(n, k):
a cell outside it is beaten by at least k' cells in its own column (or row)
that are inside it. So

    product_topk: top_k(a, k') and top_k(b, k'), then top_k of the k'^2 sums
                  -> O(n + k^2) per token instead of O(N)   (product keys, PKM)
    full_grid_topk: top_k over all N sums (the reference; O(N) per token)
    pallas:         product_topk as one kernel (pallas_kernels/product_topk.py)

select the same experts (up to ties) with the same scores, and gradients reach
a and b only through the selected cells (the VJP of lax.top_k). OmniMoE feeds
log-softmaxed, batch-normalised logits (omnimoe.py); PEER feeds query-key
dot products (peer.py).
"""

import jax
import jax.numpy as jnp


def product_topk(a: jax.Array, b: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """a, b: [T, n] -> (scores [T, k], expert ids [T, k] int32), best first."""
  n = a.shape[-1]
  kk = min(n, k)
  sa, ia = jax.lax.top_k(a, kk)
  sb, ib = jax.lax.top_k(b, kk)
  cand = (sa[:, :, None] + sb[:, None, :]).reshape(a.shape[0], kk * kk)
  scores, flat = jax.lax.top_k(cand, k)
  rows = jnp.take_along_axis(ia, flat // kk, axis=-1)
  cols = jnp.take_along_axis(ib, flat % kk, axis=-1)
  return scores, (rows * n + cols).astype(jnp.int32)


def full_grid_topk(a: jax.Array, b: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The reference: scores all N = n^2 cells, then top_k."""
  grid = (a[:, :, None] + b[:, None, :]).reshape(a.shape[0], -1)
  scores, idx = jax.lax.top_k(grid, k)
  return scores, idx.astype(jnp.int32)


def pallas_topk(a: jax.Array, b: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """product_topk as one Pallas kernel (imported on first use)."""
  # pylint: disable-next=import-outside-toplevel
  from pallas_kernels.product_topk import product_topk_pallas
  return product_topk_pallas(a, b, k)


GRID_TOPK = {"product": product_topk, "full": full_grid_topk, "pallas": pallas_topk}


def grid_side(num_experts: int) -> int:
  """n with n * n == num_experts, or a ValueError."""
  n = int(round(num_experts ** 0.5))
  if n * n != num_experts:
    raise ValueError(f"num_experts={num_experts} is not a perfect square.")
  return n
