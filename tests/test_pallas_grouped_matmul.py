"""Grouped matmul kernels (gmm, tgmm) and the differentiable op, in interpret mode.

Both kernel variants (Mosaic-style "tpu", Triton-style "gpu") are checked
against the masked dense reference and jax.lax.ragged_dot, on groupings with
empty groups, one group holding every row, rows in the zero tail, group sizes
and row counts that are not multiples of the row tile, and K, N that are not
multiples of the preferred tile. An output row no kernel program writes reads
as NaN in interpret mode, so a skipped visit fails the comparison.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import grouped_matmul as gm
from pallas_kernels.group_metadata import make_group_metadata, reference_visits
from pallas_kernels.grouped_matmul import GroupedMatmulPlan, grouped_matmul, make_plan, ragged_dot
from pallas_kernels.grouped_matmul_reference import gmm_reference, tgmm_reference

VARIANTS = ("gpu", "tpu")

# name: (group_sizes, rows); row tile 8 in the kernel tests.
GROUPINGS = {
    "empty_first_middle_last": ([0, 7, 0, 20, 0], 32),
    "one_group_every_row": ([0, 32, 0], 32),
    "all_rows_in_tail": ([0, 0, 0], 32),
    "sizes_off_tile_with_tail": ([5, 0, 11, 3], 32),
}


def _normal(seed, shape, dtype):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def assert_close(actual, expected, dtype):
  """float32 to accumulation-order error; bfloat16 to ~2e-2 relative."""
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  assert not np.isnan(actual).any(), "unwritten (NaN) output elements"
  scale = max(1.0, float(np.abs(expected).max()))
  if dtype == jnp.bfloat16:
    np.testing.assert_allclose(actual, expected, rtol=2e-2, atol=2e-2 * scale)
  else:
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def _visits(meta):
  count = int(meta.num_visits)
  return list(zip(np.asarray(meta.visit_group)[:count].tolist(),
                  np.asarray(meta.visit_tile)[:count].tolist()))


# --- metadata -------------------------------------------------------------------------------


def _random_groupings(seed, count):
  rng = np.random.default_rng(seed)
  cases = []
  for _ in range(count):
    groups = int(rng.integers(1, 7))
    tm = int(rng.choice([4, 8, 16]))
    rows = tm * int(rng.integers(1, 6))
    cuts = np.sort(rng.integers(0, rows + 1, size=groups))
    sizes = np.diff(np.concatenate([[0], cuts])).tolist()
    cases.append((sizes, rows, tm))
  return cases


EDGE_GROUPINGS = [([0, 7, 0, 20, 0], 32, 8), ([0, 32, 0], 32, 8), ([0, 0, 0], 32, 8),
                  ([5, 0, 11, 3], 32, 8), ([16, 16], 32, 16), ([1] * 9, 16, 4), ([0], 8, 8)]
SLOW = pytest.mark.slow


@pytest.mark.parametrize("sizes,rows,tm", EDGE_GROUPINGS + _random_groupings(0, 5) + [
    pytest.param(*case, marks=SLOW) for case in _random_groupings(1, 20)])
def test_plan_visits_match_reference(sizes, rows, tm):
  plan = make_plan(jnp.array(sizes, jnp.int32), rows, tiling=(tm, 16, 16), variant="gpu")
  assert (plan.num_rows, plan.row_tile, plan.num_groups) == (rows, tm, len(sizes))
  np.testing.assert_array_equal(plan.forward.offsets, np.concatenate([[0], np.cumsum(sizes)]))
  assert _visits(plan.forward) == reference_visits(sizes, rows, tm)
  assert _visits(plan.weight_grad) == reference_visits(sizes, rows, tm, visit_empty_groups=True)


def test_plan_pads_rows_and_cuts_groups_at_the_row_count():
  plan = make_plan(jnp.array([30, 30], jnp.int32), 40, tiling=(16, 16, 16), variant="gpu")
  assert plan.num_rows == 48
  np.testing.assert_array_equal(plan.forward.offsets, [0, 30, 40])
  assert _visits(plan.forward) == reference_visits([30, 10], 48, 16)


# --- kernels --------------------------------------------------------------------------------


def _run_kernels(variant, lhs, rhs, dout, group_sizes, tiling):
  """(gmm, gmm with rhs given as [G, N, K], tgmm) straight from the kernels."""
  rows, num_groups = lhs.shape[0], rhs.shape[0]

  @jax.jit
  def run(lhs, rhs, dout):
    meta = make_group_metadata(group_sizes, rows, tiling[0])
    meta_w = make_group_metadata(group_sizes, rows, tiling[0], visit_empty_groups=True)
    kw = dict(variant=variant, tiling=tiling, interpret=True)
    out = gm.gmm(lhs, rhs, meta, **kw)
    out_t = gm.gmm(lhs, jnp.swapaxes(rhs, 1, 2), meta, transpose_rhs=True, **kw)
    grad_w = gm.tgmm(lhs, dout, meta_w, num_groups=num_groups, **kw)
    return out, out_t, grad_w

  return run(lhs, rhs, dout)


def _check_kernels(variant, sizes, rows, dtype, k_dim=32, n_dim=32, tiling=(8, 16, 16)):
  lhs = _normal(1, (rows, k_dim), dtype)
  rhs = _normal(2, (len(sizes), k_dim, n_dim), dtype)
  dout = _normal(3, (rows, n_dim), dtype)
  group_sizes = jnp.array(sizes, jnp.int32)
  out, out_t, grad_w = _run_kernels(variant, lhs, rhs, dout, group_sizes, tiling)
  expected = gmm_reference(lhs, rhs, group_sizes)
  assert out.dtype == dtype and grad_w.shape == rhs.shape
  assert_close(out, expected, dtype)
  assert_close(out_t, expected, dtype)
  assert_close(grad_w, tgmm_reference(lhs, dout, group_sizes), dtype)
  if dtype == jnp.float32:
    assert_close(out, jax.lax.ragged_dot(lhs, rhs, group_sizes), dtype)
    _, ragged_vjp = jax.vjp(lambda w: jax.lax.ragged_dot(lhs, w, group_sizes), rhs)
    assert_close(grad_w, ragged_vjp(dout)[0], dtype)
  # Rows past the groups are zeros, and an empty group's weight gradient is zeros.
  total = sum(sizes)
  assert not np.asarray(out[total:]).any()
  for g, size in enumerate(sizes):
    if size == 0:
      assert not np.asarray(grad_w[g]).any()


@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernels_float32(variant, grouping):
  sizes, rows = GROUPINGS[grouping]
  _check_kernels(variant, sizes, rows, jnp.float32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernels_bfloat16(variant):
  _check_kernels(variant, [5, 0, 11, 3], 32, jnp.bfloat16)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernels_keep_non_finite_tail_rows_out(variant):
  """NaN in rows past the groups (say, unused capacity) reaches no output and no gradient."""
  sizes, rows = [5, 0, 11, 3], 32
  lhs = _normal(1, (rows, 16), jnp.float32).at[19:].set(jnp.nan)
  rhs = _normal(2, (len(sizes), 16, 16), jnp.float32)
  dout = _normal(3, (rows, 16), jnp.float32).at[19:].set(jnp.inf)
  group_sizes = jnp.array(sizes, jnp.int32)
  out, out_t, grad_w = _run_kernels(variant, lhs, rhs, dout, group_sizes, (8, 16, 16))
  assert_close(out, gmm_reference(lhs, rhs, group_sizes), jnp.float32)
  assert_close(out_t, gmm_reference(lhs, rhs, group_sizes), jnp.float32)
  assert_close(grad_w, tgmm_reference(lhs, dout, group_sizes), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernels_bfloat16_all_groupings(variant, grouping):
  sizes, rows = GROUPINGS[grouping]
  _check_kernels(variant, sizes, rows, jnp.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernels_many_groups_larger_tiles(variant):
  sizes = np.random.default_rng(5).multinomial(100, np.ones(9) / 9).tolist()
  _check_kernels(variant, sizes, 128, jnp.float32, k_dim=64, n_dim=96, tiling=(16, 32, 32))


# --- the differentiable op ------------------------------------------------------------------

OP_SIZES = [12, 0, 25, 9]   # sum 46 of M = 50: rows past the groups, an empty middle group
OP_SHAPE = (50, 48, 80)     # M not a multiple of tm = 16; K, N not multiples of 32


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=SLOW)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_op_matches_reference_and_ragged_dot(variant, dtype):
  rows, k_dim, n_dim = OP_SHAPE
  lhs = _normal(1, (rows, k_dim), dtype)
  rhs = _normal(2, (len(OP_SIZES), k_dim, n_dim), dtype)
  group_sizes = jnp.array(OP_SIZES, jnp.int32)
  out = jax.jit(lambda a, b: ragged_dot(a, b, group_sizes, variant=variant, tiling=(16, 32, 32),
                                        interpret=True))(lhs, rhs)
  assert out.shape == (rows, n_dim) and out.dtype == dtype
  assert_close(out, gmm_reference(lhs, rhs, group_sizes), dtype)
  assert_close(out, jax.lax.ragged_dot(lhs, rhs, group_sizes), dtype)


@pytest.mark.parametrize("variant", VARIANTS)
def test_op_default_tiling_and_dims_off_sixteen(variant):
  """K = 24, N = 40 are not multiples of 16 (the gpu variant pads them); f32 out of bf16."""
  lhs = _normal(1, (20, 24), jnp.bfloat16)
  rhs = _normal(2, (3, 24, 40), jnp.bfloat16)
  group_sizes = jnp.array([0, 13, 4], jnp.int32)
  out = jax.jit(lambda a, b: grouped_matmul(a, b, group_sizes, variant=variant, interpret=True,
                                            preferred_element_type=jnp.float32))(lhs, rhs)
  assert out.dtype == jnp.float32
  assert_close(out, gmm_reference(lhs, rhs, group_sizes, preferred_element_type=jnp.float32),
               jnp.bfloat16)


def _grad_check(variant, transpose_rhs, dtype, sizes=OP_SIZES, shape=OP_SHAPE):
  rows, k_dim, n_dim = shape
  lhs = _normal(1, (rows, k_dim), dtype)
  rhs_shape = (len(sizes), n_dim, k_dim) if transpose_rhs else (len(sizes), k_dim, n_dim)
  rhs = _normal(2, rhs_shape, dtype)
  weights = _normal(3, (rows, n_dim), jnp.float32)
  group_sizes = jnp.array(sizes, jnp.int32)

  def loss(op, lhs, rhs):
    return jnp.sum(op(lhs, rhs).astype(jnp.float32) * weights)

  kernel_op = lambda a, b: grouped_matmul(a, b, group_sizes, variant=variant, interpret=True,
                                          tiling=(16, 32, 32), transpose_rhs=transpose_rhs)
  reference_op = lambda a, b: gmm_reference(a, b, group_sizes, transpose_rhs=transpose_rhs)
  value, grads = jax.jit(jax.value_and_grad(lambda a, b: loss(kernel_op, a, b), (0, 1)))(lhs, rhs)
  value_ref, grads_ref = jax.value_and_grad(lambda a, b: loss(reference_op, a, b), (0, 1))(lhs, rhs)
  assert_close(value, value_ref, dtype)
  for grad, grad_ref, primal in zip(grads, grads_ref, (lhs, rhs)):
    assert grad.dtype == primal.dtype and grad.shape == primal.shape
    assert_close(grad, grad_ref, dtype)


@pytest.mark.parametrize("variant,transpose_rhs", [
    ("gpu", False), ("gpu", True), ("tpu", False), pytest.param("tpu", True, marks=SLOW)])
def test_op_gradients_float32(variant, transpose_rhs):
  _grad_check(variant, transpose_rhs, jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_op_gradients_bfloat16(variant, transpose_rhs):
  _grad_check(variant, transpose_rhs, jnp.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_op_gradients_edge_groupings(variant):
  for sizes in ([0, 50, 0], [0, 0, 0], [3, 0, 0]):
    _grad_check(variant, False, jnp.float32, sizes=sizes)


@pytest.mark.parametrize("variant", VARIANTS)
def test_op_group_sizes_past_the_rows_are_cut(variant):
  lhs = _normal(1, (24, 16), jnp.float32)
  rhs = _normal(2, (2, 16, 16), jnp.float32)
  group_sizes = jnp.array([20, 20], jnp.int32)
  out = grouped_matmul(lhs, rhs, group_sizes, variant=variant, tiling=(16, 16, 16),
                       interpret=True)
  assert_close(out, gmm_reference(lhs, rhs, group_sizes), jnp.float32)


def test_one_plan_serves_a_swiglu_forward_and_backward(monkeypatch):
  """gate, up and down share one plan; visits are built twice (once per list), not per call."""
  rows, width, hidden, num_groups = 40, 32, 48, 3
  x = _normal(1, (rows, width), jnp.float32)
  w_gate = _normal(2, (num_groups, width, hidden), jnp.float32) / 4
  w_up = _normal(3, (num_groups, width, hidden), jnp.float32) / 4
  w_down = _normal(4, (num_groups, hidden, width), jnp.float32) / 4
  group_sizes = jnp.array([9, 0, 27], jnp.int32)
  builds = []
  real_builder = gm.make_group_metadata
  monkeypatch.setattr(gm, "make_group_metadata",
                      lambda *a, **k: builds.append(k) or real_builder(*a, **k))

  def swiglu(matmul, x, w_gate, w_up, w_down):
    h = jax.nn.silu(matmul(x, w_gate)) * matmul(x, w_up)
    return jnp.sum(jnp.tanh(matmul(h, w_down)))

  def with_plan(*args):
    plan = make_plan(group_sizes, rows, tiling=(16, 16, 16), variant="gpu")
    matmul = lambda a, b: grouped_matmul(a, b, None, metadata=plan, tiling=(16, 16, 16),
                                         variant="gpu", interpret=True)
    return swiglu(matmul, *args)

  reference = lambda *args: swiglu(lambda a, b: gmm_reference(a, b, group_sizes), *args)
  args = (x, w_gate, w_up, w_down)
  value, grads = jax.jit(jax.value_and_grad(with_plan, argnums=(0, 1, 2, 3)))(*args)
  assert len(builds) == 2
  value_ref, grads_ref = jax.value_and_grad(reference, argnums=(0, 1, 2, 3))(*args)
  assert_close(value, value_ref, jnp.float32)
  for grad, grad_ref in zip(grads, grads_ref):
    assert_close(grad, grad_ref, jnp.float32)


def test_explicit_plan_equals_implicit_plan():
  lhs = _normal(1, (24, 16), jnp.float32)
  rhs = _normal(2, (3, 16, 32), jnp.float32)
  group_sizes = jnp.array([7, 0, 10], jnp.int32)
  kw = dict(tiling=(8, 16, 16), variant="tpu", interpret=True)

  cotangent = _normal(3, (24, 32), jnp.float32)

  @jax.jit
  def both(lhs, rhs):
    plan = make_plan(group_sizes, 24, tiling=kw["tiling"], variant="tpu")
    explicit = lambda a, b: grouped_matmul(a, b, group_sizes, metadata=plan, **kw)
    implicit = lambda a, b: grouped_matmul(a, b, group_sizes, **kw)
    results = []
    for op in (explicit, implicit):
      out, vjp = jax.vjp(op, lhs, rhs)
      results.append((out, *vjp(cotangent)))
    return results

  explicit, implicit = both(lhs, rhs)
  assert_close(explicit[0], gmm_reference(lhs, rhs, group_sizes), jnp.float32)
  for a, b in zip(explicit, implicit):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant,platform,custom_call", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
def test_compiled_kernels_lower_for_their_platform(variant, platform, custom_call):
  """The non-interpret path (default tiles, K = 48 and N = 80 odd-sized) lowers to Triton / Mosaic.

  No accelerator here: this checks the Pallas lowering rules, not the final compile."""
  lhs = jax.ShapeDtypeStruct((200, 48), jnp.bfloat16)
  group_sizes = jax.ShapeDtypeStruct((3,), jnp.int32)
  for transpose_rhs, rhs_shape in ((False, (3, 48, 80)), (True, (3, 80, 48))):
    rhs = jax.ShapeDtypeStruct(rhs_shape, jnp.bfloat16)
    loss = lambda a, b, s: jnp.sum(grouped_matmul(
        a, b, s, variant=variant, interpret=False, transpose_rhs=transpose_rhs).astype(jnp.float32))
    text = jax.jit(jax.value_and_grad(loss, (0, 1))).trace(lhs, rhs, group_sizes).lower(
        lowering_platforms=(platform,)).as_text()
    assert text.count(custom_call) == 3   # forward gmm, input-gradient gmm, tgmm


def test_plan_is_a_pytree_with_static_tiling():
  plan = make_plan(jnp.array([3, 5], jnp.int32), 10, tiling=(8, 16, 16), variant="gpu")
  leaves, treedef = jax.tree_util.tree_flatten(plan)
  assert len(leaves) == 8 and all(leaf.dtype == jnp.int32 for leaf in leaves)
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert isinstance(rebuilt, GroupedMatmulPlan) and (rebuilt.row_tile, rebuilt.num_rows) == (8, 16)


def test_mismatched_plans_and_tiles_are_refused():
  lhs = jnp.zeros((24, 16), jnp.float32)
  rhs = jnp.zeros((3, 16, 32), jnp.float32)
  group_sizes = jnp.array([7, 0, 10], jnp.int32)
  plan = make_plan(group_sizes, 24, tiling=(8, 16, 16), variant="gpu")
  with pytest.raises(ValueError, match="rows"):
    grouped_matmul(lhs[:8], rhs, group_sizes, metadata=plan, variant="gpu")
  with pytest.raises(ValueError, match="groups"):
    grouped_matmul(lhs, rhs[:2], None, metadata=plan, variant="gpu")
  with pytest.raises(ValueError, match="row tile"):
    grouped_matmul(lhs, rhs, group_sizes, metadata=plan, tiling=(16, 16, 16), variant="gpu")
  with pytest.raises(ValueError, match="power of two"):
    grouped_matmul(lhs, rhs, group_sizes, tiling=(12, 16, 16), variant="gpu")
  with pytest.raises(ValueError, match="disagree on K"):
    grouped_matmul(lhs, rhs, group_sizes, transpose_rhs=True, variant="gpu")
  with pytest.raises(ValueError, match="one size per group"):
    grouped_matmul(lhs, rhs, group_sizes[:2], variant="gpu")
