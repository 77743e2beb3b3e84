"""Product-key top-k as one kernel: the k best cells a_r + b_c of an n x n grid.

For each token (a, b: [n] sub-key scores; expert r * n + c scores a_r + b_c):

    (sa, ia) = top-k'(a),  (sb, ib) = top-k'(b)      k' = min(n, k)
    cand[p * k' + q] = sa_p + sb_q                   the k'^2 cells that can win
    (scores, f) = top-k(cand);  ids = ia[f // k'] * n + ib[f % k']

which is moejax.papers.omnimoe.product_router.product_topk (see there why the k best
cells lie among the k'^2). One program handles a tile of tokens and does
every top-k by rounds of "max, first position holding it, mark it taken"
(k' rounds per axis, k over the candidates), all on 2-D [tokens, lanes]
tiles: the candidate row is built lane by lane with selects, never by a
gather or a 3-D reshape. So the body needs nothing but BlockSpecs with static
index maps and elementwise ops and row reductions, which Mosaic (TPU) and
Triton (GPU) both lower; the same body serves both variants. Lanes are padded
to powers of two (Triton requires it; padding lanes start "taken", so they are
never chosen).

Ties: every round takes the first position holding the maximum, exactly as
lax.top_k does, so the ids equal product_topk's also under ties (among equal
sums: the better-ranked row of a, then the better-ranked column of b; within
a or b the lower index). full_grid_topk breaks ties by the lower id instead,
so the two agree up to ties. Scores are summed in float32 and returned in a's
dtype: for bfloat16 inputs the order can differ from product_topk's (which
sums in bfloat16) only between sums that round to the same bfloat16 value.

NaN scores are not supported (a NaN maximum matches no position).

The backward is cheap JAX glue (a scatter-add of T*k values): a selected cell
sends its score cotangent to a[row] and to b[col] and nothing else gets any,
as the VJP of lax.top_k does.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import platform


def _top_rounds(values, available, rounds: int, width: int):
  """`rounds` rounds of (max, first lane holding it, take it) over [tt, L] values.

  Returns (maxima [tt, width] float32, lanes [tt, width] int32); columns past
  `rounds` are left -inf / 0."""
  lane = jax.lax.broadcasted_iota(jnp.int32, values.shape, 1)
  out_col = jax.lax.broadcasted_iota(jnp.int32, (values.shape[0], width), 1)
  big = jnp.int32(values.shape[1])
  maxima = jnp.full((values.shape[0], width), -jnp.inf, jnp.float32)
  lanes = jnp.zeros((values.shape[0], width), jnp.int32)
  for r in range(rounds):
    live = jnp.where(available, values, -jnp.inf)
    best = jnp.max(live, axis=1, keepdims=True)
    first = jnp.min(jnp.where(available & (live == best), lane, big), axis=1, keepdims=True)
    available = available & (lane != first)
    maxima = jnp.where(out_col == r, best, maxima)
    lanes = jnp.where(out_col == r, first, lanes)
  return maxima, lanes


def _column(tile, col: int):
  """tile[:, col] as [tt, 1], by a masked row reduction (no lane gather)."""
  lane = jax.lax.broadcasted_iota(jnp.int32, tile.shape, 1)
  if jnp.issubdtype(tile.dtype, jnp.floating):
    return jnp.max(jnp.where(lane == col, tile, -jnp.inf), axis=1, keepdims=True)
  return jnp.max(jnp.where(lane == col, tile, jnp.iinfo(tile.dtype).min), axis=1,
                 keepdims=True)


def _product_topk_kernel(a_ref, b_ref, scores_ref, ids_ref, *, n: int, k: int):
  """a_ref, b_ref: [tt, n_pad]; scores_ref, ids_ref: [tt, k_pad]."""
  kk = min(n, k)
  a = a_ref[...].astype(jnp.float32)
  b = b_ref[...].astype(jnp.float32)
  tt, n_pad = a.shape
  kk_pad = platform.next_power_of_two(kk)
  real = jax.lax.broadcasted_iota(jnp.int32, (tt, n_pad), 1) < n
  sa, ia = _top_rounds(a, real, kk, kk_pad)
  sb, ib = _top_rounds(b, real, kk, kk_pad)
  # Candidate lane p * kk + q holds sa_p + sb_q and the expert id ia_p * n + ib_q
  # (ranks from compares, not integer division, which Mosaic may not vectorise).
  cand_pad = platform.next_power_of_two(kk * kk)
  lane = jax.lax.broadcasted_iota(jnp.int32, (tt, cand_pad), 1)
  row_rank = jnp.zeros_like(lane)
  for p in range(1, kk):
    row_rank += (lane >= p * kk).astype(jnp.int32)
  col_rank = lane - kk * row_rank
  cand_a = jnp.zeros((tt, cand_pad), jnp.float32)
  cand_b = jnp.zeros((tt, cand_pad), jnp.float32)
  cand_id = jnp.zeros((tt, cand_pad), jnp.int32)
  for p in range(kk):
    cand_a = jnp.where(row_rank == p, _column(sa, p), cand_a)
    cand_id = jnp.where(row_rank == p, _column(ia, p) * n, cand_id)
  for q in range(kk):
    cand_b = jnp.where(col_rank == q, _column(sb, q), cand_b)
    cand_id = jnp.where(col_rank == q, cand_id + _column(ib, q), cand_id)
  k_pad = scores_ref.shape[1]
  scores, flat = _top_rounds(cand_a + cand_b, lane < kk * kk, k, k_pad)
  out_col = jax.lax.broadcasted_iota(jnp.int32, (tt, k_pad), 1)
  ids = jnp.zeros((tt, k_pad), jnp.int32)
  for j in range(k):
    pick = jnp.max(jnp.where(lane == _column(flat, j), cand_id, -1), axis=1, keepdims=True)
    ids = jnp.where(out_col == j, pick, ids)
  scores_ref[...] = scores.astype(scores_ref.dtype)
  ids_ref[...] = ids


def _forward(a, b, k: int, variant: str, interpret: bool, block_tokens: int):
  num_tokens, n = a.shape
  n_pad, k_pad = platform.next_power_of_two(n), platform.next_power_of_two(k)
  tt = min(block_tokens, platform.next_power_of_two(num_tokens))
  t_pad = pl.cdiv(num_tokens, tt) * tt
  pad = ((0, t_pad - num_tokens), (0, n_pad - n))
  a_p = jnp.pad(a, pad)
  b_p = jnp.pad(b, pad)
  in_spec = pl.BlockSpec((tt, n_pad), lambda i: (i, 0))
  out_spec = pl.BlockSpec((tt, k_pad), lambda i: (i, 0))
  if variant == "tpu":
    params = pltpu.CompilerParams(dimension_semantics=("parallel",))
  else:
    params = pltriton.CompilerParams(num_warps=4, num_stages=1)
  scores, ids = pl.pallas_call(
      functools.partial(_product_topk_kernel, n=n, k=k),
      grid=(t_pad // tt,),
      in_specs=[in_spec, in_spec],
      out_specs=[out_spec, out_spec],
      out_shape=[jax.ShapeDtypeStruct((t_pad, k_pad), a.dtype),
                 jax.ShapeDtypeStruct((t_pad, k_pad), jnp.int32)],
      compiler_params=params,
      interpret=interpret,
  )(a_p, b_p)
  return scores[:num_tokens, :k], ids[:num_tokens, :k]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _product_topk(a, b, k, variant, interpret, block_tokens):
  return _forward(a, b, k, variant, interpret, block_tokens)


def _product_topk_fwd(a, b, k, variant, interpret, block_tokens):
  scores, ids = _forward(a, b, k, variant, interpret, block_tokens)
  return (scores, ids), (ids, jnp.zeros((0, a.shape[1]), a.dtype))


def _product_topk_bwd(k, variant, interpret, block_tokens, residuals, cotangents):
  """d a[t, row] += d score and d b[t, col] += d score at each selected cell."""
  del k, variant, interpret, block_tokens
  ids, side = residuals
  n = side.shape[1]
  dscores, _ = cotangents
  tok = jnp.arange(ids.shape[0], dtype=jnp.int32)[:, None]
  zeros = jnp.zeros((ids.shape[0], n), side.dtype)
  da = zeros.at[tok, ids // n].add(dscores.astype(side.dtype))
  db = zeros.at[tok, ids % n].add(dscores.astype(side.dtype))
  return da, db


_product_topk.defvjp(_product_topk_fwd, _product_topk_bwd)


def product_topk_pallas(a: jax.Array, b: jax.Array, k: int, *, variant: str | None = None,
                        interpret: bool | None = None,
                        block_tokens: int | None = None) -> tuple[jax.Array, jax.Array]:
  """a, b: [T, n] -> (scores [T, k] in a's dtype, expert ids [T, k] int32 = row * n + col),
  best first; the same contract as product_router.product_topk.

  block_tokens: tokens per program (rounded up to a power of two); default 16 on
  the Triton variant (the [tokens, k'^2] tiles live in registers), 64 on Mosaic."""
  if a.ndim != 2 or a.shape != b.shape or a.dtype != b.dtype:
    raise ValueError(f"a and b must be [T, n] arrays of one shape and dtype; got "
                     f"{a.shape} {a.dtype} and {b.shape} {b.dtype}.")
  n = a.shape[1]
  if not 1 <= k <= n * n:
    raise ValueError(f"k={k} must lie in [1, n * n = {n * n}]; choose a smaller top_k.")
  variant, interpret = platform.resolve(variant, interpret)
  block_tokens = block_tokens or (64 if variant == "tpu" else 16)
  return _product_topk(a, b, k, variant, interpret, platform.next_power_of_two(block_tokens))
