"""Gather/scatter grouped matmuls and the fused MoE FFN against independent references.

Kernels (Pallas interpret mode on CPU) are compared with the per-row references
of pallas_kernels/gather_scatter_reference.py over ragged groups (an empty
group, a group holding every row, a zero tail, rows with no token, sizes not
divisible by the tile). Unwritten outputs read as NaN in interpret mode, so
full-array comparisons also catch rows no program wrote. moe_ffn is compared
with a loop over tokens and slots: numpy in float64 for values, jax.grad of a
jnp loop for gradients (x, combine_weights and all three weights).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from moejax.moe.dispatch import expert_ffn
from pallas_kernels import gather_scatter_matmul as gs
from pallas_kernels import gather_scatter_reference as ref
from pallas_kernels.group_metadata import make_group_metadata
from pallas_kernels.expert_layout import sort_by_expert
from pallas_kernels.moe_ffn import merge_repeated_experts, moe_ffn

TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _close(actual, expected, dtype, scale=1.0):
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             rtol=tol["rtol"], atol=tol["atol"] * scale)


def _normal(rng, shape, dtype, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def _row_tokens(rng, sizes, num_rows, num_tokens, no_token_rows=()):
  """Each group's rows name distinct tokens (a token has one row per expert);
  rows past the groups name token T (none); no_token_rows also get T."""
  parts = [rng.permutation(num_tokens)[:n] for n in sizes]
  tail = np.full(num_rows - int(np.sum(sizes)), num_tokens)
  tokens = np.concatenate(parts + [tail]).astype(np.int32)
  tokens[list(no_token_rows)] = num_tokens
  return jnp.asarray(tokens)


# Group layouts over M = 32 rows, tm = 8: ragged with an empty group and a
# tail; one group holding every row; the last group empty and rows up to M.
LAYOUTS = {
    "ragged": ([5, 0, 11, 3], 32),
    "one_group": ([0, 32, 0, 0], 32),
    "full_no_tail": ([7, 9, 16, 0], 32),
}
TILING = (8, 16, 16)
NUM_TOKENS = 37  # more than any group's rows: a token has one row per group


def _case(layout, dtype, seed=0):
  sizes, rows = LAYOUTS[layout]
  rng = np.random.default_rng(seed)
  tokens = _row_tokens(rng, sizes, rows, NUM_TOKENS, no_token_rows=(1,))
  meta = make_group_metadata(jnp.asarray(sizes, jnp.int32), rows, TILING[0])
  return rng, np.asarray(sizes), rows, tokens, meta


@pytest.mark.parametrize("layout,dtype,transpose_rhs", [
    ("ragged", jnp.float32, False), ("ragged", jnp.bfloat16, True),
    ("one_group", jnp.float32, True), ("full_no_tail", jnp.bfloat16, False)])
def test_gather_matmul(layout, dtype, transpose_rhs):
  rng, sizes, rows, tokens, meta = _case(layout, dtype)
  x = _normal(rng, (NUM_TOKENS, 48), dtype)
  rhs = _normal(rng, (4, 40, 48) if transpose_rhs else (4, 48, 40), dtype, 0.2)
  scale = _normal(rng, (rows,), jnp.float32)
  out = gs.gather_matmul(x, rhs, tokens, meta, row_scale=scale, transpose_rhs=transpose_rhs,
                         tiling=TILING)
  assert out.shape == (rows, 40) and out.dtype == dtype
  expected = ref.gather_matmul_reference(x, rhs, tokens, sizes, row_scale=scale,
                                         transpose_rhs=transpose_rhs)
  _close(out, expected, dtype, scale=3.0)
  assert np.all(np.asarray(out[int(sizes.sum()):], np.float32) == 0)  # the tail
  assert np.all(np.asarray(out[1], np.float32) == 0)                  # the row with no token


@pytest.mark.parametrize("layout,dtype", [("ragged", jnp.float32), ("one_group", jnp.bfloat16)])
def test_gather_swiglu(layout, dtype):
  rng, sizes, rows, tokens, meta = _case(layout, dtype)
  x = _normal(rng, (NUM_TOKENS, 48), dtype)
  w_gate, w_up = _normal(rng, (4, 48, 40), dtype, 0.2), _normal(rng, (4, 48, 40), dtype, 0.2)
  h, a, u = gs.gather_swiglu(x, w_gate, w_up, tokens, meta, return_preactivations=True,
                             tiling=TILING)
  h_ref, a_ref, u_ref = ref.gather_swiglu_reference(x, w_gate, w_up, tokens, sizes)
  for actual, expected in ((h, h_ref), (a, a_ref), (u, u_ref)):
    assert actual.dtype == dtype
    _close(actual, expected, dtype, scale=3.0)
  h_only = gs.gather_swiglu(x, w_gate, w_up, tokens, meta, tiling=TILING)
  np.testing.assert_array_equal(np.asarray(h_only, np.float32), np.asarray(h, np.float32))


@pytest.mark.parametrize("layout,dtype", [
    ("ragged", jnp.float32), ("one_group", jnp.bfloat16), ("full_no_tail", jnp.float32)])
def test_scatter_matmul(layout, dtype):
  rng, sizes, rows, tokens, meta = _case(layout, dtype)
  num_tokens = NUM_TOKENS
  lhs = _normal(rng, (rows, 48), dtype)
  rhs = _normal(rng, (4, 48, 40), dtype, 0.2)
  scale = _normal(rng, (rows,), jnp.float32)
  y = gs.scatter_matmul(lhs, rhs, tokens, meta, num_tokens, row_scale=scale, tiling=TILING)
  assert y.shape == (num_tokens, 40) and y.dtype == jnp.float32
  expected = ref.scatter_matmul_reference(lhs, rhs, tokens, sizes, num_tokens, row_scale=scale)
  _close(y, expected, dtype, scale=4.0)
  # Tokens that own no row in any group get exactly zero.
  owned = np.zeros(num_tokens, bool)
  t = np.asarray(tokens)[:int(sizes.sum())]
  owned[t[t < num_tokens]] = True
  assert not owned.all()
  assert np.all(np.asarray(y)[~owned] == 0)


def test_scatter_matmul_two_terms_transposed():
  """dx = dA Wg^T + dU Wu^T: two (lhs, rhs) terms in one accumulator."""
  rng, sizes, rows, tokens, meta = _case("ragged", jnp.float32)
  lhs = [_normal(rng, (rows, 40), jnp.float32), _normal(rng, (rows, 24), jnp.float32)]
  rhs = [_normal(rng, (4, 48, 40), jnp.float32, 0.2), _normal(rng, (4, 48, 24), jnp.float32)]
  y = gs.scatter_matmul(lhs, rhs, tokens, meta, NUM_TOKENS, transpose_rhs=True, tiling=TILING)
  expected = ref.scatter_matmul_reference(lhs, rhs, tokens, sizes, NUM_TOKENS, transpose_rhs=True)
  _close(y, expected, jnp.float32, scale=4.0)


@pytest.mark.parametrize("layout,dtype,gather", [
    ("ragged", jnp.float32, "lhs"), ("ragged", jnp.bfloat16, "rhs"),
    ("one_group", jnp.float32, "rhs"), ("full_no_tail", jnp.bfloat16, "lhs")])
def test_gather_tgmm(layout, dtype, gather):
  rng, sizes, rows, tokens, meta = _case(layout, dtype)
  token_side = _normal(rng, (NUM_TOKENS, 48), dtype)
  row_side = _normal(rng, (rows, 40), dtype)
  lhs, rhs = (token_side, row_side) if gather == "lhs" else (row_side, token_side)
  scale = _normal(rng, (rows,), jnp.float32)
  dw = gs.gather_tgmm(lhs, rhs, tokens, meta, gather=gather, row_scale=scale, tiling=TILING)
  assert dw.shape == (4, lhs.shape[1], rhs.shape[1]) and dw.dtype == jnp.float32
  expected = ref.gather_tgmm_reference(lhs, rhs, tokens, sizes, gather=gather, row_scale=scale)
  _close(dw, expected, dtype, scale=10.0)
  for g in np.flatnonzero(sizes == 0):    # empty groups are written, as zeros
    assert np.all(np.asarray(dw[g]) == 0)


def test_kernels_check_their_inputs():
  _, _, rows, tokens, meta = _case("ragged", jnp.float32)
  x = jnp.zeros((NUM_TOKENS, 48))
  with pytest.raises(ValueError, match="multiple of the row tile"):
    gs.gather_matmul(x, jnp.zeros((4, 48, 16)), tokens, meta, tiling=(12, 16, 16))
  with pytest.raises(ValueError, match="contract"):
    gs.gather_matmul(x, jnp.zeros((4, 32, 16)), tokens, meta, tiling=TILING)
  with pytest.raises(ValueError, match="one rhs per lhs"):
    gs.scatter_matmul([jnp.zeros((rows, 48))] * 2, [jnp.zeros((4, 48, 16))], tokens, meta,
                      NUM_TOKENS)
  with pytest.raises(ValueError, match="visit slots"):
    gs.gather_matmul(x, jnp.zeros((4, 48, 16)), tokens, meta, tiling=(16, 16, 16))
  with pytest.raises(ValueError, match="gather="):
    gs.gather_tgmm(x, jnp.zeros((rows, 8)), tokens, meta, gather="both")


def test_gpu_kernels_lower_to_triton():
  """Each kernel goes through Pallas' Triton lowering for a CUDA target (no GPU needed,
  nothing runs): catches constructs that only interpret mode accepts."""
  num_tokens, rows, tiling = 24, 64, (16, 16, 32)
  sizes = jnp.array([20, 0, 30, 6], jnp.int32)
  tokens = jnp.zeros(rows, jnp.int32)
  x, scale = jnp.zeros((num_tokens, 32), jnp.bfloat16), jnp.zeros(rows)
  w, rows_f = jnp.zeros((4, 32, 64), jnp.bfloat16), jnp.zeros((rows, 64), jnp.bfloat16)
  run = dict(tiling=tiling, interpret=False)

  def lowers(fn, *args):
    meta_fn = lambda s: make_group_metadata(s, rows, tiling[0])
    text = jax.jit(lambda s, *a: fn(meta_fn(s), *a)).trace(sizes, *args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "triton" in text

  lowers(lambda m, x, w, s: gs.gather_matmul(x, w, tokens, m, row_scale=s, **run), x, w, scale)
  lowers(lambda m, y, w: gs.gather_matmul(y, w, tokens, m, transpose_rhs=True, **run),
         rows_f[:num_tokens], w)
  lowers(lambda m, x, w: gs.gather_swiglu(x, w, w, tokens, m, return_preactivations=True,
                                          **run), x, w)
  lowers(lambda m, h, w, s: gs.scatter_matmul([h, h], [w, w], tokens, m, num_tokens,
                                              row_scale=s, transpose_rhs=True, **run),
         rows_f, w, scale)
  lowers(lambda m, x, h, s: gs.gather_tgmm(x, h, tokens, m, gather="lhs", row_scale=s, **run),
         x, rows_f, scale)
  lowers(lambda m, h, x: gs.gather_tgmm(h, x, tokens, m, gather="rhs", **run), rows_f, x)


# --------------------------------------------------------------------------- moe_ffn


def _silu(a):
  return a / (1 + np.exp(-a))


def loop_values(x, idx, w, wg, wu, wd):
  """y[t] = sum_j w[t, j] SwiGLU_{idx[t, j]}(x[t]) over tokens and slots, float64."""
  x, w, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, w, wg, wu, wd))
  idx = np.asarray(idx)
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for j in range(idx.shape[1]):
      e = idx[t, j]
      if e < wg.shape[0]:
        y[t] += w[t, j] * ((_silu(x[t] @ wg[e]) * (x[t] @ wu[e])) @ wd[e])
  return y


def loop_jnp(idx, x, w, wg, wu, wd):
  """The same loop in jnp (differentiable): a fori_loop over tokens, slots unrolled."""
  num_experts = wg.shape[0]

  def token(t, y):
    acc = jnp.zeros(x.shape[1], jnp.float32)
    for j in range(idx.shape[1]):
      e = jnp.minimum(idx[t, j], num_experts - 1)
      h = jax.nn.silu(x[t] @ wg[e]) * (x[t] @ wu[e])
      acc = acc + jnp.where(idx[t, j] < num_experts, w[t, j], 0.0) * (h @ wd[e])
    return y.at[t].set(acc)

  return jax.lax.fori_loop(0, x.shape[0], token, jnp.zeros(x.shape, jnp.float32))


def make_routing(seed, num_tokens, k, num_experts, *, repeat=False, one_expert=False):
  """Distinct experts per token (as top-k gives), expert E-1 never chosen (empty),
  token 2 routed nowhere, one slot of token 4 empty; repeat: token 0 names an
  expert twice; one_expert: every routed pair goes to expert 1."""
  rng = np.random.default_rng(seed)
  idx = np.stack([rng.permutation(num_experts - 1)[:k] for _ in range(num_tokens)])
  if one_expert:
    idx[:, 0], idx[:, 1:] = 1, num_experts
  idx[2, :] = num_experts
  idx[4, -1] = num_experts
  if repeat:
    idx[0, :2] = idx[0, 0]
  return idx.astype(np.int32)


def make_ffn(seed, num_tokens, d, f, num_experts, k, dtype=jnp.float32, **routing):
  rng = np.random.default_rng(seed + 1)
  x = _normal(rng, (num_tokens, d), dtype)
  w = jnp.asarray(rng.random((num_tokens, k)), dtype)
  wg = _normal(rng, (num_experts, d, f), dtype, d ** -0.5)
  wu = _normal(rng, (num_experts, d, f), dtype, d ** -0.5)
  wd = _normal(rng, (num_experts, f, d), dtype, f ** -0.5)
  return make_routing(seed, num_tokens, k, num_experts, **routing), (x, w, wg, wu, wd)


FFN_SHAPE = dict(num_tokens=13, d=32, f=48, num_experts=5, k=2)  # 26 pairs: not a tile multiple
FFN_TILING = (16, 16, 16)


def _check_ffn(idx, params, dtype, **options):
  """moe_ffn's values and gradients (one jitted vjp) against the loops."""
  x, w, wg, wu, wd = params
  rng = np.random.default_rng(7)
  cotangent = jnp.asarray(rng.standard_normal(x.shape), dtype)
  expected = loop_values(x, idx, w, wg, wu, wd)
  f32 = [a.astype(jnp.float32) for a in params]
  loss_ref = lambda *p: jnp.sum(loop_jnp(jnp.asarray(idx), *p) * cotangent.astype(jnp.float32))
  grads_ref = jax.jit(jax.grad(loss_ref, argnums=range(5)))(*f32)

  @jax.jit
  def values_and_grads(*p):
    y, pullback = jax.vjp(lambda *q: moe_ffn(q[0], jnp.asarray(idx), *q[1:], **options), *p)
    return y, pullback(cotangent)

  y, grads = values_and_grads(*params)
  assert y.shape == x.shape and y.dtype == dtype
  _close(y, expected, dtype)
  for name, g, g_ref, p in zip(("x", "w", "wg", "wu", "wd"), grads, grads_ref, params):
    assert g.shape == p.shape and g.dtype == p.dtype, name
    _close(g, g_ref, dtype, scale=4.0)
  return y


@pytest.mark.parametrize("fused", [True, False])
def test_moe_ffn_matches_loop_and_sorted_backend(fused):
  idx, params = make_ffn(0, **FFN_SHAPE)
  y = _check_ffn(idx, params, jnp.float32, fused=fused, tiling=FFN_TILING)
  x, w, wg, wu, wd = params
  y_sorted, dropped = expert_ffn("sorted", x, jnp.asarray(idx), w, wg, wu, wd, block_size=8)
  assert int(dropped) == 0
  _close(y, y_sorted, jnp.float32)


def test_moe_ffn_bf16_fused():
  idx, params = make_ffn(1, **FFN_SHAPE, dtype=jnp.bfloat16)
  _check_ffn(idx, params, jnp.bfloat16, fused=True, tiling=FFN_TILING)


def test_moe_ffn_one_expert_and_repeated_expert():
  """Every pair on one expert (one group spans all rows), and token 0 naming that
  expert in two slots, which must both count (merged before the scatter)."""
  idx, params = make_ffn(2, **{**FFN_SHAPE, "k": 3}, one_expert=True, repeat=True)
  assert idx[0, 0] == idx[0, 1] == 1 and (idx[:, 0] == 1).sum() == FFN_SHAPE["num_tokens"] - 1
  _check_ffn(idx, params, jnp.float32, fused=True, tiling=FFN_TILING)


def test_moe_ffn_unfused_tpu_variant():
  """The TPU path (Mosaic-style grouped matmul in interpret mode, XLA permutes)."""
  idx, params = make_ffn(5, **FFN_SHAPE)
  _check_ffn(idx, params, jnp.float32, fused=False, variant="tpu", tiling=(16, 16, 16))


def test_moe_ffn_rejects_fused_tpu_and_bad_shapes():
  idx, (x, w, wg, wu, wd) = make_ffn(0, **FFN_SHAPE)
  with pytest.raises(ValueError, match="no TPU variant"):
    moe_ffn(x, jnp.asarray(idx), w, wg, wu, wd, fused=True, variant="tpu")
  with pytest.raises(ValueError, match="do not chain"):
    moe_ffn(x, jnp.asarray(idx), w, wg, wu, wg, fused=True)


def test_routing_helpers():
  """sort_by_expert: rows grouped by expert, stable, inverse maps; the merge of
  repeated experts keeps sum_j w_tj per (token, expert)."""
  idx = np.array([[2, 0], [3, 3], [0, 2], [1, 3]], np.int32)   # E = 3: id 3 is none
  routing = sort_by_expert(jnp.asarray(idx), 3, 8)
  np.testing.assert_array_equal(routing.sizes, [2, 1, 2])
  np.testing.assert_array_equal(routing.row_pair, [1, 4, 6, 0, 5, 8, 8, 8])
  pair_row = np.asarray(routing.pair_row)
  for r, p in enumerate(np.asarray(routing.row_pair)):
    if p < 8:
      assert pair_row[p] == r
  assert set(pair_row[[2, 3, 7]]) == {8}
  w = jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
  merged_idx, merged_w = merge_repeated_experts(jnp.array([[1, 1, 1], [0, 2, 0]]), w, 3)
  np.testing.assert_array_equal(merged_idx, [[1, 3, 3], [0, 2, 3]])
  np.testing.assert_allclose(merged_w, [[0.6, 0, 0], [1.0, 0.5, 0]], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False])
def test_moe_ffn_larger_bf16(fused):
  idx, params = make_ffn(6, num_tokens=50, d=64, f=96, num_experts=8, k=2, dtype=jnp.bfloat16)
  _check_ffn(idx, params, jnp.bfloat16, fused=fused, tiling=(32, 32, 32))


@pytest.mark.slow
def test_moe_ffn_default_tiling_and_top1():
  idx, params = make_ffn(7, num_tokens=40, d=64, f=64, num_experts=6, k=1)
  _check_ffn(idx, params, jnp.float32, fused=True)
  _check_ffn(idx, params, jnp.float32, fused=False)
