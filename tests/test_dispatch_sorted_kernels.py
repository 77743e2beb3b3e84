"""The `sorted` backend's pieces against independent references.

Values are checked against a per-token numpy loop in float64; gradients against
jax.grad of a dense per-token formulation (every pair gathers its expert's
weights), which shares no code with the sorted/blocked path.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from moejax.moe.dispatch.block_swiglu import auto_tile_rows, block_swiglu
from pallas_kernels.row_gather import dispatch_rows, gather_pairs
from pallas_kernels.expert_layout import block_layout, padded_rows
from moejax.moe.dispatch.sorted_blocks import auto_block_size, expert_rows_sorted


def _silu(a):
  return a / (1 + np.exp(-a))


def loop_reference(x, idx, w, wg, wu, wd):
  """y[t] = sum_j w[t, j] * SwiGLU_{idx[t, j]}(x[t]), skipping idx == E; float64."""
  x, w, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, w, wg, wu, wd))
  idx = np.asarray(idx)
  num_experts = wg.shape[0]
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for j in range(idx.shape[1]):
      e = idx[t, j]
      if e < num_experts:
        h = _silu(x[t] @ wg[e]) * (x[t] @ wu[e])
        y[t] += w[t, j] * (h @ wd[e])
  return y


def dense_reference(x, idx, w, wg, wu, wd):
  """The same map written densely per pair (differentiable, no sorting)."""
  num_experts = wg.shape[0]
  valid = idx < num_experts
  e = jnp.where(valid, idx, 0)
  a = jnp.einsum("td,tkdf->tkf", x, wg[e])
  u = jnp.einsum("td,tkdf->tkf", x, wu[e])
  out = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(a) * u, wd[e])
  return jnp.einsum("tk,tkd->td", jnp.where(valid, w, 0), out)


def _normal(rng, shape, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def make_inputs(seed, num_tokens, d, f, num_experts, k):
  rng = np.random.default_rng(seed)
  x = _normal(rng, (num_tokens, d))
  wg = _normal(rng, (num_experts, d, f), d ** -0.5)
  wu = _normal(rng, (num_experts, d, f), d ** -0.5)
  wd = _normal(rng, (num_experts, f, d), f ** -0.5)
  w = _normal(rng, (num_tokens, k)) ** 2
  idx = jnp.asarray(rng.integers(0, num_experts, (num_tokens, k)), jnp.int32)
  return x, idx, w, wg, wu, wd


def value_and_grads(fn, x, idx, w, wg, wu, wd, cot):
  """fn's output and the gradients of <fn, cot> wrt x, w, wg, wu, wd."""
  def loss(x, w, wg, wu, wd):
    y = fn(x, idx, w, wg, wu, wd)
    return jnp.sum(y.astype(jnp.float32) * cot), y
  grads, y = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
      x, w, wg, wu, wd)
  return y, grads


def check_sorted(x, idx, w, wg, wu, wd, block_size, rtol=2e-4, atol=2e-5):
  idx = jnp.asarray(idx, jnp.int32)
  cot = _normal(np.random.default_rng(99), x.shape)
  sorted_fn = lambda *a: expert_rows_sorted(*a, block_size=block_size)
  y, grads = value_and_grads(sorted_fn, x, idx, w, wg, wu, wd, cot)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_allclose(np.asarray(y), loop_reference(x, idx, w, wg, wu, wd),
                             rtol=rtol, atol=atol)
  y_ref, grads_ref = value_and_grads(dense_reference, x, idx, w, wg, wu, wd, cot)
  np.testing.assert_allclose(np.asarray(y_ref), np.asarray(y), rtol=rtol, atol=atol)
  for name, g, g_ref in zip(["x", "combine_weights", "w_gate", "w_up", "w_down"],
                            grads, grads_ref):
    assert g.shape == g_ref.shape, name
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=rtol, atol=atol,
                               err_msg=f"gradient wrt {name}")
  return y, grads


@pytest.mark.parametrize("block_size", [4, 0])
def test_random_routing_with_ragged_tail(block_size):
  # 37 tokens * 2 slots: no group size is likely a multiple of the block.
  x, idx, w, wg, wu, wd = make_inputs(0, 37, 12, 10, 5, 2)
  check_sorted(x, idx, w, wg, wu, wd, block_size)


def test_empty_experts_and_dropped_pairs():
  x, idx, w, wg, wu, wd = make_inputs(1, 29, 8, 6, 7, 3)
  # Only experts 1 and 4 are used; some pairs have no expert (id == E).
  idx = np.where(np.asarray(idx) % 2 == 0, 1, 4)
  idx[::3, 1] = 7
  idx[5] = 7
  y, grads = check_sorted(x, idx, w, wg, wu, wd, 4)
  # Unused experts get exactly zero gradient; dropped pairs' weights too.
  for g in grads[2:]:
    unused = np.array([0, 2, 3, 5, 6])
    assert np.all(np.asarray(g)[unused] == 0)
  assert np.all(np.asarray(grads[1])[np.asarray(idx) == 7] == 0)
  np.testing.assert_array_equal(np.asarray(y[5]), 0)


def test_all_tokens_on_one_expert():
  x, idx, w, wg, wu, wd = make_inputs(2, 50, 8, 8, 4, 1)
  check_sorted(x, np.full(idx.shape, 3), w, wg, wu, wd, 8)


def test_repeated_expert_within_a_token():
  # Both slots of a token may name the same expert; both pairs count.
  x, idx, w, wg, wu, wd = make_inputs(3, 21, 8, 6, 3, 2)
  idx = np.repeat(np.asarray(idx)[:, :1], 2, axis=1)
  check_sorted(x, idx, w, wg, wu, wd, 4)


def test_no_pair_has_an_expert():
  x, idx, w, wg, wu, wd = make_inputs(4, 9, 8, 6, 3, 2)
  y, grads = check_sorted(x, np.full(idx.shape, 3), w, wg, wu, wd, 4)
  assert not np.any(np.asarray(y))
  assert not any(np.any(np.asarray(g)) for g in grads)


def test_many_experts_auto_block():
  x, idx, w, wg, wu, wd = make_inputs(5, 100, 16, 8, 16, 4)
  check_sorted(x, idx, w, wg, wu, wd, 0)


def test_bfloat16_activations():
  x, idx, w, wg, wu, wd = make_inputs(6, 24, 16, 8, 4, 2)
  xb = x.astype(jnp.bfloat16)

  def loss(x, wg):
    y = expert_rows_sorted(x, idx, w, wg, wu, wd, block_size=4)
    return jnp.sum(y.astype(jnp.float32)), y

  grads, y = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(xb, wg)
  assert y.dtype == jnp.bfloat16
  ref = loop_reference(xb.astype(jnp.float32), idx, w, wg, wu, wd)
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=5e-2, atol=5e-2)
  assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float32
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


def test_block_swiglu_leaves_unused_blocks_zero():
  x, idx, w, wg, wu, wd = make_inputs(7, 13, 8, 6, 3, 1)
  block = 4
  lay = jax.jit(block_layout, static_argnums=(1, 2))(idx, 3, block)
  rows = dispatch_rows(x, lay.row_pair, lay.pair_row, 1) + 1.0  # padding rows nonzero too
  out = jax.jit(block_swiglu, static_argnums=6)(rows, wg, wu, wd, lay.block_expert,
                                                lay.num_blocks, block)
  used = int(lay.num_blocks) * block
  assert used < out.shape[0]
  assert not np.any(np.asarray(out[used:]))
  for b in range(int(lay.num_blocks)):
    e = int(lay.block_expert[b])
    r = np.asarray(rows[b * block:(b + 1) * block], np.float64)
    h = _silu(r @ np.asarray(wg[e], np.float64)) * (r @ np.asarray(wu[e], np.float64))
    np.testing.assert_allclose(np.asarray(out[b * block:(b + 1) * block]),
                               h @ np.asarray(wd[e], np.float64), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("block_expert,num_blocks", [
    ([1, 1, 2, 3, 3], 5),   # experts 0 and 4 own no block; every block is in use
    ([4, 4, 4, 0, 0], 3),   # only the last expert has rows; two unused blocks
    ([0, 2, 2, 2, 2], 5),   # an empty expert between two others
])
def test_block_swiglu_gradients_with_empty_experts(block_expert, num_blocks):
  """Values and all gradients against a per-row formulation, where an empty
  expert's first block is another expert's (or past the used blocks)."""
  check_block_swiglu_against_rows(block_expert, num_blocks, num_experts=5)


@pytest.mark.parametrize("tile_rows", [4, 8, 16, 0])
def test_block_swiglu_tiles_of_every_size_agree(tile_rows):
  """An expert of 7 blocks visited as 7 single blocks, 3 pairs + 1, a 4 + 2 + 1,
  or one auto-sized tile: the same values and gradients as the per-row map."""
  check_block_swiglu_against_rows([0] * 7 + [1] * 3 + [2, 2], 11, num_experts=3,
                                  tile_rows=tile_rows)


def test_auto_tile_rows():
  assert auto_tile_rows(512, 256, 256) == 256     # 2^25 multiply-adds at the minimum
  assert auto_tile_rows(128, 192, 256) == 2048    # narrow experts take taller tiles
  assert auto_tile_rows(8, 6, 512) == 4096        # at most MAX_TILE_ROWS
  assert auto_tile_rows(8, 6, 16) == 256          # at most 16 blocks: five loops
  assert auto_tile_rows(4096, 4096, 64) == 256    # never below the minimum


def check_block_swiglu_against_rows(block_expert, num_blocks, num_experts, tile_rows=0):
  block = 4
  rng = np.random.default_rng(3)
  rows = len(block_expert) * block
  x = _normal(rng, (rows, 8))
  wg, wu = (_normal(rng, (num_experts, 8, 6), 8 ** -0.5) for _ in range(2))
  wd = _normal(rng, (num_experts, 6, 8), 6 ** -0.5)
  cot = _normal(rng, (rows, 8))
  row_expert = np.repeat(np.asarray(block_expert), block)
  live = jnp.asarray(np.arange(rows) < num_blocks * block)[:, None]

  def per_row(x, wg, wu, wd):
    e = jnp.asarray(row_expert)
    a = jnp.einsum("rd,rdf->rf", x, wg[e])
    u = jnp.einsum("rd,rdf->rf", x, wu[e])
    return jnp.where(live, jnp.einsum("rf,rfd->rd", jax.nn.silu(a) * u, wd[e]), 0.0)

  def blocked(x, wg, wu, wd):
    return block_swiglu(x, wg, wu, wd, jnp.asarray(block_expert, jnp.int32),
                        jnp.int32(num_blocks), block, tile_rows=tile_rows)

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=(0, 1, 2, 3)))

  (ref_value, ref_grads), (value, grads) = (loss(f)(x, wg, wu, wd) for f in (per_row, blocked))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)
  for e in set(range(num_experts)) - set(block_expert[:num_blocks]):
    assert not np.any(np.asarray(grads[1][e])) and not np.any(np.asarray(grads[3][e]))


@pytest.mark.parametrize("block_size", [1, 4, 8])
def test_block_layout_invariants(block_size):
  num_experts, k = 6, 3
  idx = np.random.default_rng(8).integers(0, num_experts + 1, (23, k))
  idx[:, 0] = np.minimum(idx[:, 0], 2)  # uneven groups, some empty, some pairs dropped
  lay = jax.jit(block_layout, static_argnums=(1, 2))(jnp.asarray(idx), num_experts,
                                                     block_size)
  flat = idx.reshape(-1)
  num_pairs = flat.size
  num_rows = padded_rows(num_pairs, num_experts, block_size)
  pair_row, row_pair = np.asarray(lay.pair_row), np.asarray(lay.row_pair)
  block_expert, num_blocks = np.asarray(lay.block_expert), int(lay.num_blocks)
  assert row_pair.shape == (num_rows,) and block_expert.shape == (num_rows // block_size,)

  sizes = np.bincount(flat, minlength=num_experts + 1)[:num_experts]
  np.testing.assert_array_equal(np.asarray(lay.group_sizes), sizes)
  assert num_blocks == sum(-(-s // block_size) for s in sizes)

  routed = flat < num_experts
  np.testing.assert_array_equal(pair_row[~routed], num_rows)
  rows = pair_row[routed]
  assert len(set(rows.tolist())) == rows.size          # a unique row per pair
  assert np.all(rows < num_blocks * block_size)         # within the used blocks
  np.testing.assert_array_equal(row_pair[rows], np.nonzero(routed)[0])  # inverse maps
  np.testing.assert_array_equal(block_expert[rows // block_size], flat[routed])
  padding = np.setdiff1d(np.arange(num_rows), rows)
  np.testing.assert_array_equal(row_pair[padding], num_pairs)
  used = block_expert[:num_blocks]
  assert np.all(np.diff(used) >= 0)                     # blocks sorted by expert
  np.testing.assert_array_equal(np.bincount(used, minlength=num_experts),
                                [-(-s // block_size) for s in sizes])
  # Stable: within an expert, pairs keep their original order.
  for e in range(num_experts):
    r = pair_row[flat == e]
    assert np.all(np.diff(r) == 1)


def _take(a, i):
  return jnp.take(a, i, axis=0, mode="fill", fill_value=0)


def test_gather_gradients_match_plain_take():
  num_experts, k, block = 4, 2, 4
  x, idx, w, *_ = make_inputs(9, 11, 8, 4, num_experts, k)
  idx = np.array(idx)
  idx[3, 1] = num_experts
  lay = jax.jit(block_layout, static_argnums=(1, 2))(idx, num_experts, block)
  rng = np.random.default_rng(10)
  rows_cot = _normal(rng, (lay.row_pair.shape[0], 8))
  pairs_cot = _normal(rng, (idx.size, 8))

  f = lambda x: jnp.sum(dispatch_rows(x, lay.row_pair, lay.pair_row, k) * rows_cot)
  f_ref = lambda x: jnp.sum(_take(x, lay.row_pair // k) * rows_cot)
  for a, b in zip(jax.jit(jax.value_and_grad(f))(x), jax.jit(jax.value_and_grad(f_ref))(x)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

  y_rows = _normal(rng, (lay.row_pair.shape[0], 8))
  g = lambda y: jnp.sum(gather_pairs(y, lay.pair_row, lay.row_pair) * pairs_cot)
  g_ref = lambda y: jnp.sum(_take(y, lay.pair_row) * pairs_cot)
  for a, b in zip(jax.jit(jax.value_and_grad(g))(y_rows),
                  jax.jit(jax.value_and_grad(g_ref))(y_rows)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_auto_block_size():
  assert auto_block_size(8192 * 2, 8) == 256
  assert auto_block_size(8192 * 8, 64) == 256
  for pairs, experts in [(10, 100), (8192 * 8, 256), (1 << 20, 4), (64, 1)]:
    b = auto_block_size(pairs, experts)
    assert 16 <= b <= 256 and b & (b - 1) == 0


def test_grouped_layout_equals_one_call_per_group_and_recompute_equals_stored(monkeypatch):
  """Experts of three widths in one sorted layout (MoHGE): values and gradients
  equal separate per-group calls of the plain sorted backend, and the
  recomputing backward equals the one that stores pre-activations."""
  from moejax.moe.dispatch import sorted_blocks  # pylint: disable=import-outside-toplevel
  expert_rows_sorted_groups = sorted_blocks.expert_rows_sorted_groups
  rng = np.random.default_rng(7)
  d, tokens, k, widths, per_group = 8, 13, 2, (3, 5, 7), 2
  x = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, per_group * len(widths) + 1, size=(tokens, k)), jnp.int32)
  cw = jnp.asarray(rng.uniform(size=(tokens, k)), jnp.float32)
  stacks = [tuple(jnp.asarray(0.3 * rng.normal(size=s), jnp.float32)
                  for s in ((per_group, d, w), (per_group, d, w), (per_group, w, d)))
            for w in widths]

  def grouped(x, stacks):
    return expert_rows_sorted_groups(x, idx, cw, stacks, block_size=4)

  def per_group_calls(x, stacks):
    y = 0.0
    for g, (wg, wu, wd) in enumerate(stacks):
      inside = (idx >= g * per_group) & (idx < (g + 1) * per_group)
      local = jnp.where(inside, idx - g * per_group, per_group)
      y = y + expert_rows_sorted(x, local, cw, wg, wu, wd, block_size=4)
    return y

  proj = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
  results = {}
  for name, fn in (("grouped", grouped), ("per_group", per_group_calls)):
    results[name] = jax.value_and_grad(lambda x, s, f=fn: jnp.sum(f(x, s) * proj),
                                       argnums=(0, 1))(x, stacks)
  # The grouped path recomputes pre-activations; force the storing backward too.
  real = sorted_blocks.block_swiglu_groups
  asked = []  # what the grouped path asked for, before the override
  monkeypatch.setattr(sorted_blocks, "block_swiglu_groups",
                      lambda *a, recompute=False: asked.append(recompute)
                      or real(*a, recompute=False))
  results["stored"] = jax.value_and_grad(lambda x, s: jnp.sum(grouped(x, s) * proj),
                                         argnums=(0, 1))(x, stacks)
  assert asked and all(asked)  # the override ran, in place of recomputation
  for name in ("per_group", "stored"):
    for a, b in zip(jax.tree.leaves(results["grouped"]), jax.tree.leaves(results[name])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
  assert float(jnp.abs(results["grouped"][0]).max()) > 0
