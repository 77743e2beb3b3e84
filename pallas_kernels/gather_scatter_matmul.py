"""Grouped matmuls that permute on load and unpermute on store (the ScatterMoE idea).

Rows r = 0..M-1 are (token, slot) pairs sorted by expert and grouped as in
group_metadata.py (group g = rows offsets[g]..offsets[g+1]-1, group G = the
tail); row_token[r] is the token of row r (any id outside [0, T) means none).
Instead of copying tokens into a [M, d] expert-ordered buffer and reading the
[M, d] expert outputs back, the matmuls index the token arrays directly:

  gather_matmul   out[r] = s_r * x[row_token[r]] @ W[g(r)]         (0 in the tail)
  gather_swiglu   h[r] = silu(x_r Wg[g]) * (x_r Wu[g]),  x_r = x[row_token[r]]
                  (two accumulators; the pre-activations a, u on request)
  scatter_matmul  y[t] += s_r * sum_i lhs_i[r] @ W_i[g(r)]   for every row r of token t
  gather_tgmm     dW[g] = sum_{r in g} L_r^T (s_r R_r), with L or R read through row_token

so the dispatched [T*k, d] copy and the per-pair [T*k, d] output never exist;
a routed SwiGLU FFN only materialises [M, f] rows (moe_ffn.py).

Why these shapes. gather_matmul and scatter_matmul run one program per
(visit, n tile) over the visit list of group_metadata (a row tile straddling a
group boundary is visited once per group, each visit owning only its group's
rows); the program loops over K in tk steps into f32 accumulators. The gather
is a masked load whose row indices come from row_token (rows with no token read
zero); the scatter is a pltriton.atomic_add of the scaled [tm, tn] block into
an f32 [T + 1, N] output whose extra row takes the rows that have no token, so
no mask reaches the atomic. A token may own rows in several groups (its k
experts), visited by different programs, hence atomics. gather_tgmm runs one
program per (group, k tile, n tile) looping over its group's rows (a trip count
read from the offsets; an empty group stores zeros), as weight gradients need.

Each token appears at most once in one group's rows when its k experts are
distinct; moe_ffn merges repeated experts of a token first. This matters only
in interpret mode, where JAX emulates the atomic add as gather, add, scatter
(two adds to one address in one call keep one); GPU atomics add both.

GPU only. These are Triton-dialect kernels (whole-array refs, per-row pointer
gathers). On TPU a data-dependent row gather or scatter is one DMA per row, not
a block copy that a BlockSpec index map can express, so there is no TPU
variant: moe_ffn's TPU path permutes with XLA gathers around the plain grouped
matmul instead. Index arrays are built at full [rows, cols] shape (not a
vector plus a slice) because the interpret-mode emulation of loads and atomics
takes either all slices or all arrays; Triton takes both.

Triton needs power-of-two blocks of at least 16 along a dot, so tiles (from
fit_tile) should be such on a real GPU; interpret mode accepts any that divide.
These ops have no VJP of their own: moe_ffn writes the backward out with them.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.group_metadata import GroupMetadata, max_visits
from pallas_kernels.grouped_matmul import DEFAULT_TILING as GROUPED_MATMUL_TILING
from pallas_kernels.platform import fit_tile, resolve

DEFAULT_TILING = GROUPED_MATMUL_TILING["gpu"]  # (tm rows, tk contraction, tn output columns)


# ----------------------------------------------------------------------------- helpers


def _tiles(tiling, rows: int, k: int, n: int) -> tuple[int, int, int]:
  """(tm, tk, tn): tm as given (must divide rows), tk and tn fitted to K and N."""
  tm, tk, tn = tiling or DEFAULT_TILING
  if rows % tm:
    raise ValueError(f"The row count {rows} is not a multiple of the row tile {tm}; pad the "
                     "rows (and build the metadata) with the same tm.")
  return tm, fit_tile(k, tk), fit_tile(n, tn)


def _compiler_params(tiling=None):
  """8 warps for 128 x 128 output tiles and larger, 4 below."""
  big = tiling is not None and tiling[0] * tiling[2] >= 128 * 128
  return pltriton.CompilerParams(num_warps=8 if big else 4, num_stages=3)


def _interpret(interpret):
  return resolve("gpu", interpret)[1]


def _bounds(meta: GroupMetadata, num_rows: int) -> jax.Array:
  """[G + 2]: group g (G = the tail) holds rows bounds[g] .. bounds[g+1] - 1."""
  return jnp.concatenate([meta.offsets.astype(jnp.int32), jnp.array([num_rows], jnp.int32)])


def _meta_args(meta: GroupMetadata, num_rows: int):
  return (meta.num_visits.reshape(1).astype(jnp.int32), meta.visit_group.astype(jnp.int32),
          meta.visit_tile.astype(jnp.int32), _bounds(meta, num_rows))


def _full_index(rows, cols):
  """Row and column index arrays broadcast to [len(rows), len(cols)]."""
  shape = (rows.shape[0], cols.shape[0])
  return jnp.broadcast_to(rows[:, None], shape), jnp.broadcast_to(cols[None, :], shape)


def _span(start, size):
  return start + jnp.arange(size, dtype=jnp.int32)


def _load_token_rows(ref, tokens, ok, col0, width):
  """ref[tokens, col0:col0+width], rows where ok is False read as zero."""
  r, c = _full_index(jnp.where(ok, tokens, 0), _span(col0, width))
  mask = jnp.broadcast_to(ok[:, None], r.shape)
  return pltriton.load(ref.at[r, c], mask=mask, other=jnp.zeros((), ref.dtype))


def _load_rows(ref, row0, ok, col0, width):
  """ref[row0:row0+len(ok), col0:col0+width], rows where ok is False read as zero."""
  mask = jnp.broadcast_to(ok[:, None], (ok.shape[0], width))
  return pltriton.load(ref.at[pl.ds(row0, ok.shape[0]), pl.ds(col0, width)], mask=mask,
                       other=jnp.zeros((), ref.dtype))


def _load_weight(w_ref, group, k0, tk, n0, tn, transpose):
  if transpose:
    return w_ref[group, pl.ds(n0, tn), pl.ds(k0, tk)]
  return w_ref[group, pl.ds(k0, tk), pl.ds(n0, tn)]


def _dot(a, b, transpose_b):
  """a [m, k] @ b [k, n] (b [n, k] if transpose_b), f32 accumulation."""
  dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b.astype(a.dtype), dims, preferred_element_type=jnp.float32)


def _check_rows(name, rows, row_token, meta, tm=None):
  """row_token has one id per row; the metadata is one GroupMetadata built for tm."""
  if row_token.shape != (rows,):
    raise ValueError(f"row_token has shape {row_token.shape}; give one token id per row of "
                     f"{name} ({rows},).")
  if not isinstance(meta, GroupMetadata):
    raise ValueError(f"metadata is a {type(meta).__name__}; pass a GroupMetadata from "
                     "make_group_metadata (a grouped_matmul plan's .forward).")
  num_groups, visits = meta.offsets.shape[0] - 1, meta.visit_group.shape[0]
  if tm is not None and visits not in (max_visits(rows, num_groups, tm, False),
                                       max_visits(rows, num_groups, tm, True)):
    raise ValueError(f"The metadata has {visits} visit slots, which does not fit {rows} rows "
                     f"in tiles of tm={tm}; build it with make_group_metadata(sizes, {rows}, "
                     f"{tm}).")


def _k_dim(w, transpose):
  return w.shape[2] if transpose else w.shape[1]


def _n_dim(w, transpose):
  return w.shape[1] if transpose else w.shape[2]


# ----------------------------------------------------------------------- gather on load


def _gather_kernel(nv_ref, vg_ref, vt_ref, bounds_ref, tok_ref, x_ref, *refs, num_groups,
                   num_tokens, num_rhs, has_scale, epilogue, tm, tk, tn, k_tiles, transpose_rhs):
  w_refs = refs[:num_rhs]
  scale_ref = refs[num_rhs] if has_scale else None
  out_refs = refs[num_rhs + int(has_scale):]
  v, n = pl.program_id(0), pl.program_id(1)
  group, tile = vg_ref[v], vt_ref[v]
  row0, col0 = tile * tm, n * tn
  rows = _span(row0, tm)
  in_group = (rows >= bounds_ref[group]) & (rows < bounds_ref[group + 1])
  store_mask = jnp.broadcast_to(in_group[:, None], (tm, tn))
  live = v < nv_ref[0]

  def store(values):
    for ref, value in zip(out_refs, values):
      pltriton.store(ref.at[pl.ds(row0, tm), pl.ds(col0, tn)], value.astype(ref.dtype),
                     mask=store_mask)

  @pl.when(live & (group == num_groups))
  def _tail():
    store([jnp.zeros((tm, tn), jnp.float32)] * len(out_refs))

  @pl.when(live & (group < num_groups))
  def _visit():
    tokens = tok_ref[pl.ds(row0, tm)]
    ok = in_group & (tokens >= 0) & (tokens < num_tokens)

    def add_k_tile(k, accs):
      xb = _load_token_rows(x_ref, tokens, ok, k * tk, tk)
      return tuple(acc + _dot(xb, _load_weight(w, group, k * tk, tk, col0, tn, transpose_rhs),
                              transpose_rhs) for acc, w in zip(accs, w_refs))

    zeros = tuple(jnp.zeros((tm, tn), jnp.float32) for _ in w_refs)
    accs = jax.lax.fori_loop(0, k_tiles, add_k_tile, zeros)
    if has_scale:
      scale = scale_ref[pl.ds(row0, tm)].astype(jnp.float32)[:, None]
      accs = tuple(acc * scale for acc in accs)
    store(epilogue(accs))


def _gather_call(x, rhs, row_token, meta, *, row_scale, transpose_rhs, tiling, interpret,
                 epilogue, out_dtypes):
  rows = row_token.shape[0]
  k_dim, n_dim = _k_dim(rhs[0], transpose_rhs), _n_dim(rhs[0], transpose_rhs)
  if x.shape[1] != k_dim:
    raise ValueError(f"x has {x.shape[1]} columns but the weights contract over {k_dim}; "
                     "pass weights of shape [G, K, N] (or [G, N, K] with transpose_rhs).")
  tm, tk, tn = _tiles(tiling, rows, k_dim, n_dim)
  _check_rows("the output", rows, row_token, meta, tm)
  num_groups = rhs[0].shape[0]
  kernel = partial(_gather_kernel, num_groups=num_groups, num_tokens=x.shape[0],
                   num_rhs=len(rhs), has_scale=row_scale is not None, epilogue=epilogue,
                   tm=tm, tk=tk, tn=tn, k_tiles=k_dim // tk, transpose_rhs=transpose_rhs)
  scale = () if row_scale is None else (row_scale.astype(jnp.float32),)
  out_shape = tuple(jax.ShapeDtypeStruct((rows, n_dim), dt) for dt in out_dtypes)
  return pl.pallas_call(
      kernel, grid=(meta.visit_group.shape[0], n_dim // tn), out_shape=out_shape,
      interpret=_interpret(interpret), compiler_params=_compiler_params((tm, tk, tn)),
      name="gather_matmul")(*_meta_args(meta, rows), row_token.astype(jnp.int32), x, *rhs,
                            *scale)


def gather_matmul(x, rhs, row_token, metadata: GroupMetadata, *, row_scale=None,
                  transpose_rhs: bool = False, tiling=None, interpret=None, out_dtype=None):
  """out[r] = s_r * x[row_token[r]] @ rhs[g(r)] -> [M, N] (0 in the tail, 0 for no token).

  x [T, K]; rhs [G, K, N] ([G, N, K] with transpose_rhs); row_token [M] int;
  row_scale [M] or None; metadata from make_group_metadata(sizes, M, tm)."""
  (out,) = _gather_call(x, (rhs,), row_token, metadata, row_scale=row_scale,
                        transpose_rhs=transpose_rhs, tiling=tiling, interpret=interpret,
                        epilogue=lambda accs: accs, out_dtypes=(out_dtype or x.dtype,))
  return out


def gather_swiglu(x, w_gate, w_up, row_token, metadata: GroupMetadata, *,
                  return_preactivations: bool = False, tiling=None, interpret=None):
  """h[r] = silu(a) * u with a = x[row_token[r]] @ w_gate[g], u likewise -> [M, f].

  x [T, d]; w_gate, w_up [G, d, f]. With return_preactivations, (h, a, u), all in
  x.dtype (the SwiGLU is taken on the f32 accumulators before rounding)."""
  if w_gate.shape != w_up.shape:
    raise ValueError(f"w_gate {w_gate.shape} and w_up {w_up.shape} must have one shape.")

  def epilogue(accs):
    a, u = accs
    h = jax.nn.silu(a) * u
    return (h, a, u) if return_preactivations else (h,)

  outs = _gather_call(x, (w_gate, w_up), row_token, metadata, row_scale=None,
                      transpose_rhs=False, tiling=tiling, interpret=interpret, epilogue=epilogue,
                      out_dtypes=(x.dtype,) * (3 if return_preactivations else 1))
  return outs if return_preactivations else outs[0]


# --------------------------------------------------------------------- scatter on store


def _scatter_kernel(nv_ref, vg_ref, vt_ref, bounds_ref, tok_ref, *refs, num_groups,
                    num_tokens, num_terms, has_scale, tm, tn, k_tiles, transpose_rhs):
  lhs_refs, w_refs = refs[:num_terms], refs[num_terms:2 * num_terms]
  scale_ref = refs[2 * num_terms] if has_scale else None
  y_ref = refs[-1]  # refs[-2] is the same buffer as the (aliased) zero input
  v, n = pl.program_id(0), pl.program_id(1)
  group, tile = vg_ref[v], vt_ref[v]
  row0, col0 = tile * tm, n * tn

  @pl.when((v < nv_ref[0]) & (group < num_groups))
  def _visit():
    rows = _span(row0, tm)
    tokens = tok_ref[pl.ds(row0, tm)]
    ok = ((rows >= bounds_ref[group]) & (rows < bounds_ref[group + 1]) & (tokens >= 0)
          & (tokens < num_tokens))
    acc = jnp.zeros((tm, tn), jnp.float32)
    for lhs_ref, w_ref, (tk, trips) in zip(lhs_refs, w_refs, k_tiles):
      def add_k_tile(k, acc, lhs_ref=lhs_ref, w_ref=w_ref, tk=tk):
        a = lhs_ref[pl.ds(row0, tm), pl.ds(k * tk, tk)]
        b = _load_weight(w_ref, group, k * tk, tk, col0, tn, transpose_rhs)
        return acc + _dot(a, b, transpose_rhs)
      acc = jax.lax.fori_loop(0, trips, add_k_tile, acc)
    if has_scale:
      acc = acc * scale_ref[pl.ds(row0, tm)].astype(jnp.float32)[:, None]
    # Rows of other groups (or with no token) add zero to the spare row T.
    value = jnp.where(jnp.broadcast_to(ok[:, None], (tm, tn)), acc, 0.0)
    target = jnp.where(ok, tokens, num_tokens)
    pltriton.atomic_add(y_ref, _full_index(target, _span(col0, tn)), value)


def scatter_matmul(lhs, rhs, row_token, metadata: GroupMetadata, num_tokens: int, *,
                   row_scale=None, transpose_rhs: bool = False, tiling=None, interpret=None):
  """y[t] = sum_{r: row_token[r] = t} s_r * sum_i lhs[i][r] @ rhs[i][g(r)] -> [T, N] f32.

  lhs: [M, K_i] array or a sequence of them; rhs: [G, K_i, N] ([G, N, K_i] with
  transpose_rhs), one per lhs; row_scale [M] or None. Tail rows and rows whose
  token is outside [0, num_tokens) add nothing."""
  lhs = (lhs,) if not isinstance(lhs, (tuple, list)) else tuple(lhs)
  rhs = (rhs,) if not isinstance(rhs, (tuple, list)) else tuple(rhs)
  if len(lhs) != len(rhs) or not lhs:
    raise ValueError(f"Give one rhs per lhs (got {len(lhs)} lhs and {len(rhs)} rhs).")
  rows = lhs[0].shape[0]
  n_dim = _n_dim(rhs[0], transpose_rhs)
  for a, w in zip(lhs, rhs):
    if a.shape[0] != rows or a.shape[1] != _k_dim(w, transpose_rhs) or _n_dim(
        w, transpose_rhs) != n_dim:
      raise ValueError(f"lhs {a.shape} and rhs {w.shape} do not chain (transpose_rhs="
                       f"{transpose_rhs}); every term needs lhs [M, K] and one output width N.")
  tm, _, tn = _tiles(tiling, rows, lhs[0].shape[1], n_dim)
  _check_rows("lhs", rows, row_token, metadata, tm)
  k_tiles = []
  for a in lhs:
    tk = fit_tile(a.shape[1], (tiling or DEFAULT_TILING)[1])
    k_tiles.append((tk, a.shape[1] // tk))
  kernel = partial(_scatter_kernel, num_groups=rhs[0].shape[0], num_tokens=num_tokens,
                   num_terms=len(lhs), has_scale=row_scale is not None, tm=tm, tn=tn,
                   k_tiles=tuple(k_tiles), transpose_rhs=transpose_rhs)
  scale = () if row_scale is None else (row_scale.astype(jnp.float32),)
  args = (*_meta_args(metadata, rows), row_token.astype(jnp.int32), *lhs, *rhs, *scale)
  zeros = jnp.zeros((num_tokens + 1, n_dim), jnp.float32)
  y = pl.pallas_call(
      kernel, grid=(metadata.visit_group.shape[0], n_dim // tn),
      out_shape=jax.ShapeDtypeStruct(zeros.shape, jnp.float32),
      input_output_aliases={len(args): 0}, interpret=_interpret(interpret),
      compiler_params=_compiler_params((tm, tk, tn)), name="scatter_matmul")(*args, zeros)
  return y[:num_tokens]


# ------------------------------------------------------- weight gradient, gather on load


def _tgmm_kernel(bounds_ref, tok_ref, lhs_ref, rhs_ref, *refs, gather, has_scale, num_tokens,
                 tm, tk, tn):
  scale_ref = refs[0] if has_scale else None
  out_ref = refs[-1]
  g, kb, nb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, stop = bounds_ref[g], bounds_ref[g + 1]

  def add_row_tile(i, acc):
    row0 = start + i * tm
    in_rows = _span(row0, tm) < stop
    tokens = pltriton.load(tok_ref.at[pl.ds(row0, tm)], mask=in_rows,
                           other=jnp.full((), num_tokens, jnp.int32))
    ok = in_rows & (tokens >= 0) & (tokens < num_tokens)

    def operand(ref, gathered, col0, width):
      if gathered:
        return _load_token_rows(ref, tokens, ok, col0, width)
      return _load_rows(ref, row0, ok, col0, width)

    a = operand(lhs_ref, gather == "lhs", kb * tk, tk)
    b = operand(rhs_ref, gather == "rhs", nb * tn, tn)
    if has_scale:
      scale = pltriton.load(scale_ref.at[pl.ds(row0, tm)], mask=in_rows,
                            other=jnp.zeros((), jnp.float32))
      b = (b.astype(jnp.float32) * scale[:, None]).astype(b.dtype)
    return acc + jax.lax.dot_general(a, b.astype(a.dtype), (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  trips = (stop - start + tm - 1) // tm
  acc = jax.lax.fori_loop(0, trips, add_row_tile, jnp.zeros((tk, tn), jnp.float32))
  out_ref[g, pl.ds(kb * tk, tk), pl.ds(nb * tn, tn)] = acc.astype(out_ref.dtype)


def gather_tgmm(lhs, rhs, row_token, metadata: GroupMetadata, *, gather: str = "lhs",
                row_scale=None, tiling=None, interpret=None, out_dtype=jnp.float32):
  """dW[g] = sum_{r in group g} L_r^T (s_r R_r) -> [G, K, N] (0 for an empty group).

  gather="lhs": L_r = lhs[row_token[r]] (lhs [T, K]) and R_r = rhs[r] (rhs [M, N]);
  gather="rhs": L_r = lhs[r] (lhs [M, K]) and R_r = rhs[row_token[r]] (rhs [T, N]).
  Rows with no token contribute nothing; row_scale [M] or None."""
  if gather not in ("lhs", "rhs"):
    raise ValueError(f"gather={gather!r}; choose 'lhs' or 'rhs' (the operand indexed by token).")
  rows = row_token.shape[0]
  token_side, row_side = (lhs, rhs) if gather == "lhs" else (rhs, lhs)
  if row_side.shape[0] != rows:
    raise ValueError(f"The per-row operand has {row_side.shape[0]} rows; it needs one per "
                     f"row_token entry ({rows}).")
  _check_rows("the per-row operand", rows, row_token, metadata)
  k_dim, n_dim = lhs.shape[1], rhs.shape[1]
  tm, tk, tn = _tiles(tiling, rows, k_dim, n_dim)
  num_groups = metadata.offsets.shape[0] - 1
  kernel = partial(_tgmm_kernel, gather=gather, has_scale=row_scale is not None,
                   num_tokens=token_side.shape[0], tm=tm, tk=tk, tn=tn)
  scale = () if row_scale is None else (row_scale.astype(jnp.float32),)
  return pl.pallas_call(
      kernel, grid=(num_groups, k_dim // tk, n_dim // tn),
      out_shape=jax.ShapeDtypeStruct((num_groups, k_dim, n_dim), out_dtype),
      interpret=_interpret(interpret), compiler_params=_compiler_params((tm, tk, tn)),
      name="gather_tgmm")(_bounds(metadata, rows), row_token.astype(jnp.int32), lhs, rhs,
                          *scale)
