"""The Pallas L3 lookup kernel (pallas_kernels/l3_lookup.py, interpret mode on CPU).

    z_j = scale * K[row_j] . h,  over the rows a token's id owns that this table part holds
    m = max z,  s = sum e_j,  u = sum e_j z_j,  numer = sum e_j V[row_j],  e_j = exp(z_j - m)

Values are checked against a numpy float64 loop over each token's rows and
against moejax's XLA padded path; gradients (h, keys, values; untied and tied)
against the padded path, whose own gradients test_l3.py checks against a dense
reference. The batch holds ids with 1 row and with max_rows rows, the first and
last ids, repeats, and (in row-split parts) tokens with no local rows; T is
not a multiple of the token tile, d and e are not powers of two, and the row
chunk is smaller than max_rows, so tokens loop over several chunks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax.config.base import base_config
from moejax import config as config_lib
from moejax import sharding
from moejax.errors import ConfigError
from moejax.papers.l3 import lookup as l3_lookup
from moejax.papers.l3.layer import L3Layer
from pallas_kernels import l3_lookup as kernel
from pallas_kernels import platform
from tests.helpers import tiny_config
from tests.sharded_layer import assert_same_layer_results, loss_and_grads

K, D, E = 5, 12, 6  # max_rows; d and e pad to 16 and 8 inside the kernel
COUNTS = np.array([5, 1, 3, 5, 2, 1, 4, 5, 1, 2, 3, 1])  # first id: K rows; last: 1
OFFSETS = np.concatenate([[0], np.cumsum(COUNTS)[:-1]])
ROWS = int(COUNTS.sum())  # 33
# 11 tokens (tile 4: a partial last tile): first and last ids, 1-row and K-row
# ids, repeats.
IDS = np.array([0, 11, 1, 3, 3, 7, 0, 5, 2, 11, 6], np.int32)
# Table parts: rows [0, 7), [7, 20), [20, 33). The cuts split the rows of ids 2
# and 6; every part has tokens with no rows in it.
CUTS = (0, 7, 20, ROWS)
TILES = dict(token_tile=4, row_chunk=2)
SCALE = 0.7


def _case(seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(len(IDS), D)).astype(np.float32),
          (0.5 * rng.normal(size=(ROWS, D))).astype(dtype),
          rng.normal(size=(ROWS, E)).astype(dtype))


def np_partials(h, ids, keys, values, row_start, scale):
  """numpy float64, one token at a time, over its rows inside this table part."""
  ms, ss, us, numers = [], [], [], []
  for x, t in zip(h.astype(np.float64), ids):
    rows = np.arange(OFFSETS[t], OFFSETS[t] + COUNTS[t]) - row_start
    rows = rows[(rows >= 0) & (rows < keys.shape[0])]
    if rows.size == 0:
      ms.append(kernel.NEG), ss.append(0.0), us.append(0.0)
      numers.append(np.zeros(values.shape[1]))
      continue
    z = scale * keys[rows].astype(np.float64) @ x
    e = np.exp(z - z.max())
    ms.append(z.max()), ss.append(e.sum()), us.append(e @ z)
    numers.append(e @ values[rows].astype(np.float64))
  return np.array(ms), np.array(ss), np.array(us), np.stack(numers)


def _parts(h, keys, values, path, tied):
  values = keys if tied else values
  if path == "kernel":
    fn = functools.partial(kernel.lookup_partials, scale=SCALE, **TILES)
  else:
    fn = functools.partial(l3_lookup.lookup_partials, path="padded", scale=SCALE)
  return [l3_lookup.Partials(*fn(h, IDS, keys[a:b], values[a:b], OFFSETS, COUNTS,
                                 max_rows=K, row_start=a))
          for a, b in zip(CUTS[:-1], CUTS[1:])]


@functools.partial(jax.jit, static_argnames=("path", "tied"))
def _values(h, keys, values, *, path, tied=False):
  """Partials of each table part, and finalize of the whole table and of the merge."""
  values_ = keys if tied else values
  if path == "kernel":
    whole = kernel.lookup_partials(h, IDS, keys, values_, OFFSETS, COUNTS, max_rows=K,
                                   scale=SCALE, **TILES)
  else:
    whole = l3_lookup.lookup_partials(h, IDS, keys, values_, OFFSETS, COUNTS, max_rows=K,
                                      path="padded", scale=SCALE)
  parts = _parts(h, keys, values, path, tied)
  return (parts, l3_lookup.finalize(l3_lookup.Partials(*whole)),
          l3_lookup.finalize(l3_lookup.combine(parts)))


def _objective(parts, read, ent):
  """Depends on every output, and on s, u and numer of one part directly."""
  c = lambda x: jnp.cos(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape))
  p = parts[1]
  return (jnp.sum(read * c(read)) + jnp.sum(ent * jnp.sin(jnp.arange(ent.size) + 1.0))
          + 0.3 * jnp.sum(p.s * c(p.s)) - 0.2 * jnp.sum(p.u) + 0.1 * jnp.sum(p.numer * c(p.numer)))


@functools.partial(jax.jit, static_argnames=("path", "tied"))
def _grads(h, keys, values, *, path, tied):
  def loss(h, keys, values):
    parts = _parts(h, keys, values, path, tied)
    return _objective(parts, *l3_lookup.finalize(l3_lookup.combine(parts)))
  return jax.grad(loss, argnums=(0, 1, 2))(h, keys, values)


def test_partials_equal_numpy_loop_and_padded_path():
  h, keys, values = _case()
  parts, whole, merged = _values(h, keys, values, path="kernel")
  ref_parts, ref_whole, _ = _values(h, keys, values, path="padded")
  for p, ref_p, a, b in zip(parts, ref_parts, CUTS[:-1], CUTS[1:]):
    want = np_partials(h, IDS, keys[a:b], values[a:b], a, SCALE)
    for name, got, ref, np_ref in zip(p._fields, p, ref_p, want):
      assert np.all(np.isfinite(got)), name
      np.testing.assert_allclose(got, np_ref, rtol=2e-5, atol=1e-6, err_msg=name)
      np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6, err_msg=name)
    # Tokens with no rows here: exactly the empty partials.
    none = np.asarray(want[1]) == 0
    assert none.any() and not none.all()
    assert np.all(np.asarray(p.m)[none] == kernel.NEG)
    assert np.all(np.asarray(p.s)[none] == 0) and np.all(np.asarray(p.u)[none] == 0)
    assert np.all(np.asarray(p.numer)[none] == 0)
  # finalize: the whole table, and the merge of its parts, equal the padded
  # path and a softmax written out.
  m, s, u, numer = np_partials(h, IDS, keys, values, 0, SCALE)
  want = (numer / s[:, None], np.log(s) + m - u / s)
  for got in (whole, merged):
    for g, ref, np_ref in zip(got, ref_whole, want):
      np.testing.assert_allclose(g, np_ref, rtol=2e-5, atol=2e-6)
      np.testing.assert_allclose(g, ref, rtol=2e-5, atol=2e-6)
  assert kernel.NEG == l3_lookup.NEG


def test_tied_values_equal_numpy_loop():
  h, keys, _ = _case(seed=1)
  _, whole, _ = _values(h, keys, keys, path="kernel", tied=True)
  m, s, u, numer = np_partials(h, IDS, keys, keys, 0, SCALE)
  np.testing.assert_allclose(whole[0], numer / s[:, None], rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(whole[1], np.log(s) + m - u / s, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_gradients_equal_padded_path(tied):
  h, keys, values = _case(seed=2)
  if tied:
    values = keys
  got = _grads(h, keys, values, path="kernel", tied=tied)
  want = _grads(h, keys, values, path="padded", tied=tied)
  for name, g, w in zip(("h", "keys", "values"), got, want):
    assert np.all(np.isfinite(g)), name
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-6, err_msg=name)
  # Not vacuous: every part's rows get a gradient, and so do 1-row and K-row ids.
  gk = np.abs(np.asarray(got[1])).max(axis=1)
  for a, b in zip(CUTS[:-1], CUTS[1:]):
    assert gk[a:b].max() > 0
  gv = np.abs(np.asarray(got[1 if tied else 2])).max(axis=1)
  assert gv[OFFSETS[11]] > 0 and gk[OFFSETS[7] + K - 1] > 0
  # Rows of ids no token uses get exactly zero.
  unused = [t for t in range(len(COUNTS)) if t not in IDS]
  for t in unused:
    assert np.all(gk[OFFSETS[t]:OFFSETS[t] + COUNTS[t]] == 0)


def test_bfloat16_tables():
  h, keys, values = _case(seed=3)
  keys, values = jnp.asarray(keys, jnp.bfloat16), jnp.asarray(values, jnp.bfloat16)

  def loss(keys, values, path):
    parts, whole, merged = _values(h, keys, values, path=path)
    return _objective(parts, *merged), whole

  grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnames="path")
  g, whole = grad(keys, values, "kernel")
  ref_g, _ = grad(keys.astype(jnp.float32), values.astype(jnp.float32), "padded")
  m, s, u, numer = np_partials(h, IDS, np.asarray(keys, np.float64),
                               np.asarray(values, np.float64), 0, SCALE)
  np.testing.assert_allclose(whole[0], numer / s[:, None], rtol=1e-5, atol=1e-5)
  for got, want in zip(g, ref_g):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


def test_bad_arguments_raise_one_sentence():
  h, keys, values = _case()
  with pytest.raises(ValueError, match="no TPU body"):
    kernel.lookup_partials(h, IDS, keys, values, OFFSETS, COUNTS, max_rows=K, variant="tpu")
  with pytest.raises(ValueError, match="power of two"):
    kernel.lookup_partials(h, IDS, keys, values, OFFSETS, COUNTS, max_rows=K, token_tile=6)
  with pytest.raises(ValueError, match="same rows"):
    kernel.lookup_partials(h, IDS, keys, values[:-1], OFFSETS, COUNTS, max_rows=K)


def test_path_pallas_is_registered_and_uses_padded_on_tpu(monkeypatch):
  h, keys, values = _case()
  l3 = {"model.num_layers": 4, "l3.after_layers": (2,), "l3.rows": 512,
        "l3.max_rows_per_token": 4}
  config_lib.validate(tiny_config(**l3, **{"l3.path": "pallas"}), num_devices=1,
                      check_data=False)
  with pytest.raises(ConfigError, match="path='magic' is not one of"):
    config_lib.validate(tiny_config(**l3, **{"l3.path": "magic"}), num_devices=1,
                        check_data=False)
  # On TPU the path is the padded one; the kernel is not called.
  monkeypatch.setattr(platform, "default_platform", lambda: "tpu")
  monkeypatch.setattr(kernel, "lookup_partials", lambda *a, **k: pytest.fail("kernel ran"))
  got = l3_lookup.lookup_partials(h, IDS, keys, values, OFFSETS, COUNTS, max_rows=K,
                                  path="pallas")
  want = l3_lookup.lookup_partials(h, IDS, keys, values, OFFSETS, COUNTS, max_rows=K,
                                   path="padded")
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


# --- the layer ---------------------------------------------------------------

L_VOCAB, L_ROWS, L_K, L_D, L_E = 24, 64, 4, 16, 8


def _layer_counts():
  c = np.ones(L_VOCAB, np.int64)
  c[0], c[1:5] = L_K, L_K
  c[5:5 + (L_ROWS - c.sum()) // (L_K - 1)] = L_K
  c[-2] += L_ROWS - c.sum()
  assert c.sum() == L_ROWS and c.max() <= L_K
  return c


def _layer_cfg(path, tie_kv, scale_scores):
  c = base_config()
  c.model.d_model = L_D
  c.l3.rows, c.l3.max_rows_per_token, c.l3.up_dim = L_ROWS, L_K, 8
  c.l3.emb_dim = L_D if tie_kv else L_E
  c.l3.init_std, c.l3.path, c.l3.tie_kv, c.l3.scale_scores = 0.3, path, tie_kv, scale_scores
  return c


def _layer_run(path, tie_kv, scale_scores, split_tables=False):
  cfg = _layer_cfg(path, tie_kv, scale_scores)
  layer = L3Layer(cfg, 2, _layer_counts(), nnx.Rngs(params=4))
  rng = np.random.default_rng(4)
  layer.w_mix[...] = jnp.asarray(0.2 * rng.normal(size=layer.w_mix.shape), jnp.float32)
  x = jnp.asarray(rng.normal(size=(8, 3, L_D)), jnp.float32)
  ids = np.concatenate([[0, L_VOCAB - 1, 0, 1, 5], rng.integers(0, L_VOCAB, 19)])
  ids = jnp.asarray(ids.reshape(8, 3), jnp.int32)
  mesh = None
  if split_tables:
    cfg.mesh.data, cfg.mesh.expert = 2, 4
    mesh = sharding.make_mesh(cfg.mesh)
  return cfg, loss_and_grads(cfg, layer, x, mesh=mesh, token_ids=ids)


def _assert_layer_equal(got, want):
  assert_same_layer_results(got, want)
  assert np.abs(np.asarray(got[4]["keys"])).max() > 0


@pytest.mark.parametrize("tie_kv, scale_scores", [
    (False, True), pytest.param(True, False, marks=pytest.mark.slow)])
def test_layer_with_path_pallas_equals_padded(tie_kv, scale_scores):
  _, got = _layer_run("pallas", tie_kv, scale_scores)
  _assert_layer_equal(got, _layer_run("padded", tie_kv, scale_scores)[1])


def test_row_split_layer_in_interpret_mode_raises():
  """JAX's Pallas interpreter drops varying-axes types inside shard_map, so the
  row-split layer (mesh.expert = 4) asks for the padded path on CPU."""
  with pytest.raises(ValueError, match="l3.path='padded'"):
    _layer_run("pallas", False, False, split_tables=True)


@pytest.mark.parametrize("tied", [False, True])
def test_row_split_gradients_type_check_in_shard_map(tied):
  """The compiled kernel inside shard_map (traced, not run: no GPU here): tables
  split over `expert`, tokens over (data, expert); the custom VJP's table
  gradients are summed over `data`, which the tables do not vary over (without
  that sum, the custom VJP's output type check fails here)."""
  h, keys, values = _case()
  h = np.concatenate([h, h[:5]])  # 16 tokens: 2 per device
  ids = np.concatenate([IDS, IDS[:5]])
  keys, values = keys[:32], values[:32]
  if tied:
    values = keys
  mesh = jax.make_mesh((2, 4), ("data", "expert"))

  def per_shard(h, ids, keys, *maybe_values):
    vals = keys if tied else maybe_values[0]
    me = jax.lax.axis_index("expert")
    h = h + jnp.zeros_like(keys, shape=())  # one varying type, as moejax/papers/l3/parallel.py does
    p = kernel.lookup_partials(h, ids, keys, vals, OFFSETS, COUNTS, max_rows=K,
                               row_start=me * 8, interpret=False, **TILES)
    _, s, u, numer = p
    return jax.lax.psum(jnp.sum(s) + jnp.sum(numer) + jnp.sum(u), ("data", "expert"))

  tokens, rows = P(("data", "expert"), None), P("expert", None)
  ids = jax.device_put(ids, NamedSharding(mesh, P(("data", "expert"))))

  def loss(h, keys, values):
    tables = (keys,) if tied else (keys, values)
    specs = (tokens, P(("data", "expert"))) + (rows,) * len(tables)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=specs, out_specs=P())(
        h, ids, *tables)

  args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
          for x, spec in ((h, tokens), (keys, rows), (values, rows))]
  traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args)
  text = str(traced.jaxpr)
  assert text.count("pallas_call") >= 2  # the forward and backward kernels
  out = traced.out_info
  assert [o.shape for o in out] == [h.shape, keys.shape, values.shape]
