"""SwiGLU experts applied block by block to expert-sorted rows (the grouped matmul).

Rows arrive sorted by expert and each expert's group padded to a multiple of
`block_size` (see layout.py), so every block of rows belongs to one expert:

    a = x[b] W_gate[e_b],   u = x[b] W_up[e_b]
    y[b] = (SiLU(a) * u) W_down[e_b]

Two nested loops: the outer one scans the experts, taking each expert's
weights once; the inner one visits that expert's blocks (a dynamic trip count,
so compute follows the routed tokens, not the worst-case buffer; empty experts
cost nothing but the weight slice). On XLA:CPU a loop of plain dots runs at
nearly the speed of one large dot, whereas a batched dot over blocks is 2x
slower. Indexing W[e_b] inside a flat loop over blocks copies the expert's
weights for every block, and adding each block's weight gradient into an
[E, d, f] accumulator reads and writes a whole expert slice per block; with
256 experts and 64-row blocks those two made the kernel about 1.6x slower than
the nested form, where the weight gradient is summed in a small per-expert
carry and written once per expert (as the scan's output).

Gate and up are separate matmuls: concatenating them into [E, d, 2f] copies
all the weights on every call (268 MB at E=256, d=512, f=256) and bought
nothing measurable per block.

The backward pass is written out (custom VJP). Under differentiation the
forward keeps the pre-activations a and u of every row (as autodiff of a dense
SwiGLU would); recomputing them instead costs two of the five backward-side
matmuls and was slower. A plain (undifferentiated) call stores nothing.
"""

from functools import partial

import jax
import jax.numpy as jnp


def _silu_grad(a):
  s = jax.nn.sigmoid(a)
  return s * (1 + a * (1 - s))


# An expert's blocks are visited in tiles of several blocks, so small blocks
# (little padding) still give large matmuls. XLA:CPU splits a dot over its
# threads only above a size threshold: on the 2-core machine [256, 128] x
# [128, 192] runs no faster on two cores than on one, while [2048, 128] x
# [128, 192] and [256, 512] x [512, 256] (2^25 multiply-adds) run 1.6-1.8x
# faster on two (benchmarks/results/small_dots_cpu.md). So a tile takes at
# least 256 rows, and more when the expert is narrow, until one of its matmuls
# holds MIN_TILE_MACS multiply-adds.
MIN_TILE_ROWS, MAX_TILE_ROWS = 256, 4096
MIN_TILE_MACS = 2 ** 25
# An expert's visit compiles to one loop per tile size (tile, tile/2, ..., one
# block), so an automatic tile spans at most this many blocks: five loops.
MAX_TILE_BLOCKS = 16


def auto_tile_rows(d_model: int, expert_width: int, block_size: int) -> int:
  """The largest tile for experts [d_model, expert_width]: a power of two in
  [MIN_TILE_ROWS, MAX_TILE_ROWS], the smallest with rows * d * f >= MIN_TILE_MACS,
  and at most MAX_TILE_BLOCKS blocks."""
  rows = MIN_TILE_ROWS
  while rows < MAX_TILE_ROWS and rows * d_model * expert_width < MIN_TILE_MACS:
    rows *= 2
  return min(rows, MAX_TILE_BLOCKS * block_size)


def _rows(x, row, size):
  return jax.lax.dynamic_slice_in_dim(x, row, size, axis=0)


def _put(buf, value, row):
  return jax.lax.dynamic_update_slice_in_dim(buf, value.astype(buf.dtype), row, 0)


def _visit_tiles(first, count, block_size, total_blocks, tile_rows, body, carry):
  """carry = body(row, rows, carry) over blocks [first, first + count) of one
  expert, in tiles: as many of tile_rows as fit, then at most one tile of each
  smaller power-of-two number of blocks (rows is static per loop)."""
  blocks = 1
  while blocks * 2 * block_size <= tile_rows and blocks * 2 <= total_blocks:
    blocks *= 2
  pos, end = first, first + count
  while blocks >= 1:
    n = (end - pos) // blocks
    carry = jax.lax.fori_loop(
        0, n, lambda t, c, p=pos, m=blocks: body((p + t * m) * block_size,
                                                 m * block_size, c), carry)
    pos, blocks = pos + n * blocks, blocks // 2
  return carry


def expert_block_ranges(block_expert, num_blocks, num_experts):
  """(first block, block count) of each expert, each [E] int32.

  Blocks in use are a prefix sorted by expert, so each expert's blocks are
  contiguous; blocks past num_blocks are not counted."""
  used = jnp.where(jnp.arange(block_expert.shape[0]) < num_blocks, block_expert,
                   num_experts)
  count = jnp.bincount(used, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  return jnp.cumsum(count) - count, count


def varying_zeros(shape, dtype, *like):
  """Zeros varying over the same shard_map axes as the arrays in `like`.

  Inside jax.shard_map (expert parallelism) a loop carry must have the same
  varying-axes type on entry as the body gives it, and the body mixes tokens
  (split over batch axes) with weights (split over expert/tensor). zeros_like
  keeps an array's varying axes and a sum takes their union; reading that type
  directly would tie us to a field JAX has renamed between versions."""
  z = jnp.zeros(shape, dtype)
  for a in like:
    z = z + jnp.zeros_like(a, dtype=dtype, shape=())
  return z


def block_swiglu(x, w_gate, w_up, w_down, block_expert, num_blocks, block_size,
                 tile_rows: int = 0):
  """x: [blocks * block_size, d] sorted, padded rows; w_gate, w_up: [E, d, f];
  w_down: [E, f, d]; block_expert: [blocks] int; num_blocks: int scalar (blocks in
  use, a prefix). Returns [blocks * block_size, d]; rows of unused blocks are 0.
  tile_rows: the largest matmul's rows (0: auto_tile_rows)."""
  first, count = expert_block_ranges(block_expert, num_blocks, w_gate.shape[0])
  return block_swiglu_groups(x, [(w_gate, w_up, w_down)], first, count, block_size,
                             recompute=False, tile_rows=tile_rows)


def block_swiglu_groups(x, groups, first, count, block_size, recompute: bool = True,
                        tile_rows: int = 0):
  """Experts of several widths sharing one sorted layout (MoHGE).

  groups: [(w_gate [n_g, d, f_g], w_up, w_down [n_g, f_g, d]), ...], expert ids
  running group after group, so first/count ([sum n_g]) give each group's
  experts their block ranges. One custom VJP covers every group: the output
  rows (forward) and dx (backward) are threaded through the groups' expert
  scans, so each is zero-filled once, not once per group and then summed.
  Keeping pre-activations would take a [rows, f_g] buffer per group, each
  spanning all rows; recompute=True keeps none and redoes x W_gate, x W_up in
  the backward pass."""
  # Under shard_map, give rows and weights one varying-axes type before the
  # custom VJP, whose cotangents must match its inputs' types; the psums this
  # implies (over tensor for dx, over batch axes for dW) are then inserted by
  # JAX when it transposes these additions.
  weights = [w for g in groups for w in g]
  zero = varying_zeros((), x.dtype, x, *weights)
  x = x + zero.astype(x.dtype)
  groups = tuple(tuple(w + zero.astype(w.dtype) for w in g) for g in groups)
  return _block_swiglu(x, groups, first, count, (block_size, tile_rows), recompute)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _block_swiglu(x, groups, first, count, tiling, recompute):
  del recompute
  return _forward(x, groups, first, count, tiling, store=False)[0]


def _group_slices(groups, first, count):
  """(w_gate, w_up, w_down, first, count) of each group's experts."""
  offset = 0
  for wg, wu, wd in groups:
    n = wg.shape[0]
    yield wg, wu, wd, first[offset:offset + n], count[offset:offset + n]
    offset += n


def _group_tile_rows(tile_rows, w_gate, block_size):
  return tile_rows or auto_tile_rows(*w_gate.shape[-2:], block_size)


def _forward(x, groups, first, count, tiling, store):
  """y, and (if store) each group's pre-activations a = x W_gate, u = x W_up of every row.
  tiling: (block_size, tile_rows)."""
  block_size, tile_rows = tiling
  dt = x.dtype
  rows = x.shape[0]
  like = (x, *(w for g in groups for w in g))

  def expert(carry, xs):
    wg, wu, wd, start, n = xs
    wg, wu, wd = wg.astype(dt), wu.astype(dt), wd.astype(dt)

    def tile(row, size, carry):
      y, a_rows, u_rows = carry
      xb = _rows(x, row, size)
      a, u = xb @ wg, xb @ wu
      y = _put(y, (jax.nn.silu(a) * u) @ wd, row)
      if store:
        a_rows, u_rows = _put(a_rows, a, row), _put(u_rows, u, row)
      return y, a_rows, u_rows

    return _visit_tiles(start, n, block_size, rows // block_size,
                        _group_tile_rows(tile_rows, wg, block_size), tile, carry), None

  y, pre = varying_zeros(x.shape, dt, *like), []
  for wg, wu, wd, start, n in _group_slices(groups, first, count):
    pre_shape = (rows if store else 0, wg.shape[-1])
    init = (y, varying_zeros(pre_shape, dt, *like), varying_zeros(pre_shape, dt, *like))
    (y, a_rows, u_rows), _ = jax.lax.scan(expert, init, (wg, wu, wd, start, n))
    pre.append((a_rows, u_rows))
  return y, tuple(pre)


def _fwd(x, groups, first, count, tiling, recompute):
  y, pre = _forward(x, groups, first, count, tiling, store=not recompute)
  return y, (x, pre, groups, first, count)


def _bwd(tiling, recompute, res, dy):
  """With h = SiLU(a) * u, per block:
      dh = dy W_down^T,  da = dh * u * SiLU'(a),  du = dh * SiLU(a)
      dx = da W_gate^T + du W_up^T
      dW_down += h^T dy,  dW_gate += x^T da,  dW_up += x^T du
  Weight gradients are summed in float32 (or wider) over an expert's blocks."""
  x, pre, groups, first, count = res
  block_size, tile_rows = tiling
  dt = x.dtype
  like = (x, dy, *(w for g in groups for w in g))

  def expert_grads(a_rows, u_rows, acc):
    outer = partial(jnp.matmul, preferred_element_type=acc)

    def expert(dx, xs):
      wg, wu, wd, start, n = xs
      wg, wu, wd = wg.astype(dt), wu.astype(dt), wd.astype(dt)

      def tile(row, size, carry):
        dx, dwg, dwu, dwd = carry
        xb, dyb = _rows(x, row, size), _rows(dy, row, size).astype(dt)
        if recompute:
          a, u = xb @ wg, xb @ wu
        else:
          a, u = _rows(a_rows, row, size), _rows(u_rows, row, size)
        sa = jax.nn.silu(a)
        dh = dyb @ wd.T
        da, du = dh * u * _silu_grad(a), dh * sa
        dwd = dwd + outer((sa * u).T, dyb)
        dwg = dwg + outer(xb.T, da)
        dwu = dwu + outer(xb.T, du)
        return _put(dx, da @ wg.T + du @ wu.T, row), dwg, dwu, dwd

      zeros = lambda w: varying_zeros(w.shape, acc, *like)
      dx, dwg, dwu, dwd = _visit_tiles(start, n, block_size, x.shape[0] // block_size,
                                       _group_tile_rows(tile_rows, wg, block_size), tile,
                                       (dx, zeros(wg), zeros(wu), zeros(wd)))
      return dx, (dwg, dwu, dwd)
    return expert

  dx, dgroups = varying_zeros(x.shape, dt, *like), []
  for (wg, wu, wd, start, n), (a_rows, u_rows) in zip(_group_slices(groups, first, count), pre):
    acc = jnp.promote_types(wg.dtype, jnp.float32)
    dx, (dwg, dwu, dwd) = jax.lax.scan(expert_grads(a_rows, u_rows, acc), dx,
                                       (wg, wu, wd, start, n))
    dgroups.append((dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype)))
  return dx, tuple(dgroups), None, None


_block_swiglu.defvjp(_fwd, _bwd)
