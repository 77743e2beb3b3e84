"""The L3 lookup as a Pallas kernel: a per-token online softmax over the token's own rows.

Token i with id t reads the contiguous rows offsets[t] .. offsets[t] + counts[t] - 1
of K [L, d] and V [L, e] (CSR layout; a row-split table holds rows
[row_start, row_start + L) and skips the rest). With z_j = scale * K[row_j] . h_i:

    m = max_j z_j,  s = sum_j e_j,  u = sum_j e_j z_j,  numer = sum_j e_j V[row_j]
    e_j = exp(z_j - m)

and a token with no rows here gets m = NEG, s = u = 0, numer = 0 (moejax's
lookup_partials contract; m carries no gradient). The backward recomputes z_j
and e_j from the saved m (nothing per row is kept) and, from the cotangents
(ds, du, dnumer):

    dz_j = e_j (ds + du (1 + z_j) + dnumer . V_j)
    dh   = scale sum_j dz_j K_j,   dK_j += scale dz_j h,   dV_j += e_j dnumer

Design. One program per tile of tokens ("gpu", Triton-dialect Pallas, whole-array
refs). Each token loops over its own (dynamic) row count in chunks of `row_chunk`
rows, loading them by a pointer array (first local row + iota, masked past the
count and past d or e columns), and keeps the running (m, s, u, numer) of an
online softmax, so the work is the token's rows, not max_rows. The XLA padded
path instead gathers max_rows rows for every token into a [T, max_rows, d + e]
buffer; here nothing per (token, row) is ever written to memory. Tokens are
padded to a whole tile (with no rows), and h, numer and dh to power-of-two
widths (Triton blocks); the tables are read in place, never padded or copied.

The table gradients are scatter-adds with collisions (repeated ids share rows),
done with atomic adds into float32 buffers of the tables' shapes. The
alternative, a kernel writing per-(token, row) terms and an XLA scatter-add,
materialises T * max_rows * (d + e) floats, the very buffer the kernel avoids.
Atomics make the table gradient's summation order nondeterministic (float32
rounding only). Pallas interpret mode has no masked atomic, so there the mask is
dropped: masked-off lanes then add exact zeros to rows that exist, and rows
past the table are dropped by the interpreter's scatter, which gives the same
sums as the masked add the compiled kernel does.

Tied tables (values is keys) read each row once and add both terms into one
gradient buffer.

No "tpu" body: a token's rows start at a data-dependent offset, so a Mosaic
kernel would need a manual DMA per token, and the table gradient, which has no
atomics there, would need a sequential grid or a second, row-sorted pass.
moejax's path "pallas" routes TPU to the XLA padded path instead (one gather
and one scatter-add); this module raises for "tpu".

Inside shard_map (row-split tables, moejax/papers/l3/parallel.py) the outputs are typed
to vary like the inputs, and a table's gradient is summed over the axes its
tokens vary over and it does not (what autodiff does for the padded path).
JAX's Pallas interpreter fails inside a shard_map that checks varying axes, so
there this runs compiled only; interpret mode raises.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import platform

# The max score of a token with no rows: equal to moejax.papers.l3.lookup.NEG.
NEG = -1e30
# Default bound on the floats of one [row chunk, width] block (registers).
_BLOCK_FLOATS = 8192


class _Static(NamedTuple):
  """The compile-time settings of one lookup."""
  scale: float
  tied: bool
  token_tile: int
  row_chunk: int
  interpret: bool


def _check_pow2(name: str, value: int):
  if value < 1 or value & (value - 1):
    raise ValueError(f"{name}={value} must be a positive power of two (a Triton block "
                     "size); pass one such as 8 or 16.")


def token_rows(ids, offsets, counts, *, max_rows: int, row_start, local_rows: int):
  """(first local row [T], number of local rows [T]) of each token: its rows
  offsets[id] .. + min(count, max_rows) clipped to [row_start, row_start + local_rows)."""
  first = offsets[ids] - row_start
  last = first + jnp.minimum(counts[ids], max_rows)
  lo = jnp.clip(first, 0, local_rows)
  return lo, jnp.clip(last, 0, local_rows) - lo


def _chunk_rows(lo, n, c, chunk):
  """Row indices [chunk] of chunk c of a token, and which of them are its rows."""
  j = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
  return lo + j, j < n


def _num_chunks(n, chunk):
  return jax.lax.div(n + chunk - 1, jnp.int32(chunk))


def _load_rows(ref, rows, valid, width):
  """ref[rows, :width] as float32 [chunk, width_pow2]; zero off the rows and past width."""
  cols = jnp.arange(platform.next_power_of_two(width), dtype=jnp.int32)
  mask = valid[:, None] & (cols < width)[None, :]
  # Masked-off lanes are undefined after the load (no `other`, whose dtype would
  # have to match the table's); the select makes them exact zeros.
  block = pltriton.load(ref.at[rows[:, None], cols[None, :]], mask=mask)
  return jnp.where(mask, block.astype(jnp.float32), 0.0)


def _forward_kernel(lo_ref, n_ref, h_ref, k_ref, *refs, st: _Static, d: int, e: int):
  if st.tied:
    v_ref, (m_ref, s_ref, u_ref, numer_ref) = k_ref, refs
  else:
    v_ref, m_ref, s_ref, u_ref, numer_ref = refs
  tile, chunk = st.token_tile, st.row_chunk
  base = pl.program_id(0) * tile
  lanes = jnp.arange(tile, dtype=jnp.int32)

  def one_token(i, acc):
    tok = base + i
    lo, n = lo_ref[tok], n_ref[tok]
    h = h_ref[tok, :]

    def one_chunk(c, carry):
      m, s, u, numer = carry
      rows, valid = _chunk_rows(lo, n, c, chunk)
      k = _load_rows(k_ref, rows, valid, d)
      v = k if st.tied else _load_rows(v_ref, rows, valid, e)
      z = jnp.where(valid, st.scale * jnp.sum(k * h[None, :], axis=1), NEG)
      m_new = jnp.maximum(m, jnp.max(z))  # finite: every visited chunk has a row
      alpha = jnp.exp(m - m_new)
      p = jnp.where(valid, jnp.exp(z - m_new), 0.0)
      return (m_new, alpha * s + jnp.sum(p), alpha * u + jnp.sum(p * jnp.where(valid, z, 0.0)),
              alpha * numer + jnp.sum(p[:, None] * v, axis=0))

    zero = jnp.zeros((), jnp.float32)
    init = (jnp.full((), NEG, jnp.float32), zero, zero,
            jnp.zeros((numer_ref.shape[1],), jnp.float32))
    m, s, u, numer = jax.lax.fori_loop(0, _num_chunks(n, chunk), one_chunk, init)
    here = lanes == i
    m_t, s_t, u_t, numer_t = acc
    return (jnp.where(here, m, m_t), jnp.where(here, s, s_t), jnp.where(here, u, u_t),
            jnp.where(here[:, None], numer[None, :], numer_t))

  zeros = jnp.zeros((tile,), jnp.float32)
  m, s, u, numer = jax.lax.fori_loop(
      0, tile, one_token, (zeros + NEG, zeros, zeros,
                           jnp.zeros((tile, numer_ref.shape[1]), jnp.float32)))
  m_ref[pl.ds(base, tile)] = m
  s_ref[pl.ds(base, tile)] = s
  u_ref[pl.ds(base, tile)] = u
  numer_ref[pl.ds(base, tile), :] = numer


def _backward_kernel(lo_ref, n_ref, h_ref, m_ref, ds_ref, du_ref, dnumer_ref, k_ref, *refs,
                     st: _Static, d: int, e: int):
  if st.tied:
    v_ref, (_, dh_ref, dk_ref) = k_ref, refs
    dv_ref = dk_ref
  else:
    v_ref, _, _, dh_ref, dk_ref, dv_ref = refs
  tile, chunk = st.token_tile, st.row_chunk
  base = pl.program_id(0) * tile
  lanes = jnp.arange(tile, dtype=jnp.int32)

  def scatter_add(ref, rows, valid, width, val):
    cols = jnp.arange(val.shape[1], dtype=jnp.int32)
    mask = None if st.interpret else valid[:, None] & (cols < width)[None, :]
    pltriton.atomic_add(ref, (rows[:, None], cols[None, :]), val, mask=mask)

  def one_token(i, dh_t):
    tok = base + i
    lo, n, m = lo_ref[tok], n_ref[tok], m_ref[tok]
    ds, du = ds_ref[tok], du_ref[tok]
    h, dnumer = h_ref[tok, :], dnumer_ref[tok, :]

    def one_chunk(c, dh):
      rows, valid = _chunk_rows(lo, n, c, chunk)
      k = _load_rows(k_ref, rows, valid, d)
      v = k if st.tied else _load_rows(v_ref, rows, valid, e)
      z = st.scale * jnp.sum(k * h[None, :], axis=1)
      ez = jnp.where(valid, jnp.exp(jnp.where(valid, z - m, 0.0)), 0.0)
      dz = ez * (ds + du * (1.0 + z) + jnp.sum(v * dnumer[None, :], axis=1))
      dk = st.scale * dz[:, None] * h[None, :]
      dv = ez[:, None] * dnumer[None, :]
      if st.tied:
        scatter_add(dk_ref, rows, valid, d, dk + dv)
      else:
        scatter_add(dk_ref, rows, valid, d, dk)
        scatter_add(dv_ref, rows, valid, e, dv)
      return dh + st.scale * jnp.sum(dz[:, None] * k, axis=0)

    dh = jax.lax.fori_loop(0, _num_chunks(n, chunk), one_chunk,
                           jnp.zeros((h_ref.shape[1],), jnp.float32))
    return jnp.where((lanes == i)[:, None], dh[None, :], dh_t)

  dh_ref[pl.ds(base, tile), :] = jax.lax.fori_loop(
      0, tile, one_token, jnp.zeros((tile, h_ref.shape[1]), jnp.float32))


def _varying_zeros(shape, dtype, like):
  """Zeros that vary over the shard_map axes the arrays `like` vary over (inside
  a shard_map that checks them; plain zeros elsewhere)."""
  z = jnp.zeros(shape, dtype)
  for a in like:
    z = z + jnp.zeros_like(a, dtype=dtype, shape=())
  return z


def _out_struct(shape, dtype, like):
  """A pallas_call out_shape varying like `like`: pallas_call needs that type
  inside a checked shard_map (moejax/papers/l3/parallel.py), and eval_shape fills in the
  field, whose name JAX has changed between versions."""
  return jax.eval_shape(lambda: _varying_zeros(shape, dtype, like))


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; `vma` before
  return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _sum_to_type_of(grad, primal):
  """The cotangent of `primal` inside shard_map: summed over the axes the kernel
  output varies over and `primal` does not (a table split by rows only, its
  tokens split over the batch axes), as autodiff does for an implicit pvary."""
  extra = tuple(sorted(_varying_axes(grad) - _varying_axes(primal)))
  return jax.lax.psum(grad, extra) if extra else grad


def _pad(x, rows, cols=None):
  pad = [(0, rows - x.shape[0])] + ([] if cols is None else [(0, cols - x.shape[1])])
  return jnp.pad(x, pad)


def _compiler_params():
  return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _forward(h, keys, values, lo, n, st: _Static):
  t, d = h.shape
  e = keys.shape[1] if st.tied else values.shape[1]
  tp = pl.cdiv(t, st.token_tile) * st.token_tile
  dp, ep = platform.next_power_of_two(d), platform.next_power_of_two(e)
  tables = (keys,) if st.tied else (keys, values)
  like = (h, lo, *tables)
  vec = _out_struct((tp,), jnp.float32, like)
  m, s, u, numer = pl.pallas_call(
      functools.partial(_forward_kernel, st=st, d=d, e=e),
      grid=(tp // st.token_tile,),
      out_shape=(vec, vec, vec, _out_struct((tp, ep), jnp.float32, like)),
      interpret=st.interpret, compiler_params=_compiler_params(), name="l3_lookup_fwd",
  )(_pad(lo, tp), _pad(n, tp), _pad(h, tp, dp), *tables)
  return m[:t], s[:t], u[:t], numer[:t, :e]


def _backward(h, keys, values, lo, n, m, ds, du, dnumer, st: _Static):
  t, d = h.shape
  e = keys.shape[1] if st.tied else values.shape[1]
  tp = pl.cdiv(t, st.token_tile) * st.token_tile
  dp, ep = platform.next_power_of_two(d), platform.next_power_of_two(e)
  tables = (keys,) if st.tied else (keys, values)
  # Zero-initialised float32 gradient buffers, updated in place (atomic adds).
  like = (h, lo, m, ds, du, dnumer, *tables)
  grads = tuple(_varying_zeros(x.shape, jnp.float32, like) for x in tables)
  first_grad = 7 + len(tables)  # after lo, n, h, m, ds, du, dnumer, tables
  out = pl.pallas_call(
      functools.partial(_backward_kernel, st=st, d=d, e=e),
      grid=(tp // st.token_tile,),
      out_shape=(_out_struct((tp, dp), jnp.float32, like),)
                + tuple(_out_struct(g.shape, g.dtype, like) for g in grads),
      input_output_aliases={first_grad + i: 1 + i for i in range(len(grads))},
      interpret=st.interpret, compiler_params=_compiler_params(), name="l3_lookup_bwd",
  )(_pad(lo, tp), _pad(n, tp), _pad(h, tp, dp), _pad(m, tp), _pad(ds, tp), _pad(du, tp),
    _pad(dnumer, tp, ep), *tables, *grads)
  dh, *dtables = out
  dtables = [_sum_to_type_of(g, x).astype(x.dtype) for g, x in zip(dtables, tables)]
  return (_sum_to_type_of(dh[:t, :d], h), dtables[0], None if st.tied else dtables[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _partials(h, keys, values, lo, n, st):
  return _forward(h, keys, values, lo, n, st)


def _partials_fwd(h, keys, values, lo, n, st):
  out = _forward(h, keys, values, lo, n, st)
  return out, (h, keys, values, lo, n, out[0])


def _partials_bwd(st, res, cotangents):
  h, keys, values, lo, n, m = res
  _, ds, du, dnumer = cotangents  # m carries no gradient
  dh, dk, dv = _backward(h, keys, values, lo, n, m, ds, du, dnumer, st)
  return dh, dk, dv, None, None


_partials.defvjp(_partials_fwd, _partials_bwd)


def lookup_partials(h, ids, keys, values, offsets, counts, *, max_rows: int, row_start=0,
                    scale: float = 1.0, variant: str | None = None,
                    interpret: bool | None = None, token_tile: int = 8,
                    row_chunk: int | None = None):
  """(m [T], s [T], u [T], numer [T, e]) for h [T, d], ids [T] over the rows
  [row_start, row_start + L) that keys [L, d] / values [L, e] hold (values is
  keys: tied). offsets, counts: [vocab] int, global rows; counts above max_rows
  are cut to max_rows. Same contract as moejax.papers.l3.lookup.lookup_partials;
  differentiable in h, keys and values (m has no gradient). token_tile: tokens
  per program; row_chunk: rows per step of a token's loop (default 16, fewer for
  wide rows so that a [chunk, width] block stays within 8192 floats), capped at
  the power of two covering max_rows."""
  variant, interpret = platform.resolve(variant, interpret)
  if variant == "tpu":
    raise ValueError("The L3 lookup kernel has no TPU body (per-token row gathers); use "
                     "moejax's l3.path='padded' on TPU, which path 'pallas' picks there.")
  if interpret and any(_varying_axes(x) for x in (h, ids, keys, values)):
    raise ValueError("Pallas interpret mode cannot run inside a shard_map that checks "
                     "varying axes (its interpreter drops them); off a GPU, use "
                     "l3.path='padded' with tables split over mesh.expert > 1.")
  tied = values is keys
  if row_chunk is None:
    width = platform.next_power_of_two(max(keys.shape[1], values.shape[1]))
    row_chunk = max(1, min(16, _BLOCK_FLOATS // width))
  _check_pow2("token_tile", token_tile)
  _check_pow2("row_chunk", row_chunk)
  if keys.ndim != 2 or (not tied and values.shape[0] != keys.shape[0]):
    raise ValueError(f"keys {keys.shape} and values {values.shape} must be [L, d] and "
                     "[L, e] tables with the same rows; pass row blocks of equal length.")
  chunk = min(row_chunk, platform.next_power_of_two(max_rows))
  st = _Static(float(scale), tied, token_tile, chunk,
               bool(interpret))
  lo, n = token_rows(jnp.asarray(ids, jnp.int32), jnp.asarray(offsets, jnp.int32),
                     jnp.asarray(counts, jnp.int32), max_rows=max_rows,
                     row_start=jnp.asarray(row_start, jnp.int32), local_rows=keys.shape[0])
  m, s, u, numer = _partials(jnp.asarray(h, jnp.float32), keys, None if tied else values,
                             lo.astype(jnp.int32), n.astype(jnp.int32), st)
  return jax.lax.stop_gradient(m), s, u, numer
