"""Pure-JAX references for gather_scatter_matmul.py (what the tests compare against).

Each row's group comes from the group sizes alone (g(r) = the group whose
offsets range holds r; rows past the last group are the zero tail) and each
row's weight matrix is taken per row (rhs[g(r)], an [M, K, N] gather), so
nothing here shares code or tiling with the kernels. Small sizes only.
"""

import jax
import jax.numpy as jnp


def row_groups(group_sizes, num_rows: int) -> jax.Array:
  """[M] group of each row; G for rows past sum(group_sizes)."""
  ends = jnp.cumsum(jnp.asarray(group_sizes, jnp.int32))
  return jnp.searchsorted(ends, jnp.arange(num_rows), side="right").astype(jnp.int32)


def _token_rows(x, row_token):
  """x[row_token[r]], zero where the token is outside [0, T)."""
  ok = (row_token >= 0) & (row_token < x.shape[0])
  return jnp.where(ok[:, None], x[jnp.where(ok, row_token, 0)], 0), ok


def _per_row(lhs_rows, rhs, groups, transpose_rhs):
  num_groups = rhs.shape[0]
  w = rhs[jnp.minimum(groups, num_groups - 1)].astype(jnp.float32)
  if transpose_rhs:
    w = jnp.swapaxes(w, 1, 2)
  out = jnp.einsum("mk,mkn->mn", lhs_rows.astype(jnp.float32), w,
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.where((groups < num_groups)[:, None], out, 0.0)


def gather_matmul_reference(x, rhs, row_token, group_sizes, *, row_scale=None,
                            transpose_rhs=False):
  """out[r] = s_r * x[row_token[r]] @ rhs[g(r)], f32."""
  rows, _ = _token_rows(x, row_token)
  out = _per_row(rows, rhs, row_groups(group_sizes, row_token.shape[0]), transpose_rhs)
  return out if row_scale is None else out * row_scale[:, None]


def gather_swiglu_reference(x, w_gate, w_up, row_token, group_sizes):
  """(h, a, u) in f32: a = x[row_token[r]] @ w_gate[g(r)], u likewise, h = silu(a) * u."""
  a = gather_matmul_reference(x, w_gate, row_token, group_sizes)
  u = gather_matmul_reference(x, w_up, row_token, group_sizes)
  return jax.nn.silu(a) * u, a, u


def scatter_matmul_reference(lhs, rhs, row_token, group_sizes, num_tokens, *, row_scale=None,
                             transpose_rhs=False):
  """y[t] = sum_{r: row_token[r] = t} s_r * sum_i lhs_i[r] @ rhs_i[g(r)], f32 [T, N]."""
  lhs = lhs if isinstance(lhs, (tuple, list)) else (lhs,)
  rhs = rhs if isinstance(rhs, (tuple, list)) else (rhs,)
  groups = row_groups(group_sizes, row_token.shape[0])
  out = sum(_per_row(a, w, groups, transpose_rhs) for a, w in zip(lhs, rhs))
  if row_scale is not None:
    out = out * row_scale[:, None]
  ok = (row_token >= 0) & (row_token < num_tokens)
  target = jnp.where(ok, row_token, num_tokens)
  return jnp.zeros((num_tokens + 1, out.shape[1]), jnp.float32).at[target].add(out)[:num_tokens]


def gather_tgmm_reference(lhs, rhs, row_token, group_sizes, *, gather="lhs", row_scale=None):
  """dW[g] = sum_{r in g} L_r^T (s_r R_r), f32 [G, K, N]; the `gather` side is read by token."""
  if gather == "lhs":
    left, ok = _token_rows(lhs, row_token)
    right = rhs
  else:
    right, ok = _token_rows(rhs, row_token)
    left = lhs
  right = right.astype(jnp.float32) * ok[:, None]
  if row_scale is not None:
    right = right * row_scale[:, None]
  num_groups = len(group_sizes) if not hasattr(group_sizes, "shape") else group_sizes.shape[0]
  onehot = jax.nn.one_hot(row_groups(group_sizes, row_token.shape[0]), num_groups)
  return jnp.einsum("mg,mk,mn->gkn", onehot, left.astype(jnp.float32), right,
                    precision=jax.lax.Precision.HIGHEST)
