"""L3 large lookup layers: the lookup (both paths), its partials, the layer, and the
row-split tables on a mesh, against references written from the equations.

    z_j = scale * K[row_j] . h,  p = softmax(z) over the token's rows,
    a = sum_j p_j V[row_j],  H = -sum_j p_j log p_j
    y = W_mix [LN(W_up a) ; h],  h = RMSNorm(x)

The value references are numpy float64 loops over each token's rows; gradient
references are jax.grad of a pure-jnp lookup in which every token scores the
whole table under a mask. Neither imports moejax's lookup.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config.base import base_config
from moejax import sharding
from moejax.errors import ConfigError
from moejax.papers.l3 import layer as l3_module
from moejax.papers.l3 import lookup as l3_lookup
from moejax.papers.l3.layer import L3Index, L3Layer
from tests.sharded_layer import assert_same_layer_results, loss_and_grads

VOCAB, ROWS, K, D, E = 50, 200, 8, 32, 24
T = 24  # tokens of every lookup test (one compile per path)
PATHS = ("padded", "sorted")


def _counts(seed=0, first=K, last=1):
  """Rows per id in [1, K] summing to ROWS, with fixed first and last ids and
  several ids at 1 and at K."""
  rng = np.random.default_rng(seed)
  c = np.ones(VOCAB, np.int64)
  c[0], c[-1] = first, last
  c[1:4], c[4:7] = K, 1
  free = list(range(7, VOCAB - 1))
  while c.sum() < ROWS:
    i = free[rng.integers(len(free))]
    if c[i] < K:
      c[i] += 1
  return c


def _offsets(counts):
  return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _ids(counts, t, seed):
  """Token ids covering the first and last ids, count-1 and count-K ids, repeats."""
  rng = np.random.default_rng(seed)
  ones, fulls = np.flatnonzero(counts == 1), np.flatnonzero(counts == K)
  fixed = [0, VOCAB - 1, ones[0], fulls[0], fulls[0], 2, 2, 2, ones[1], VOCAB - 1]
  return np.concatenate([fixed, rng.integers(0, VOCAB, t - len(fixed))]).astype(np.int32)


def _case(seed=0, first=K, last=1):
  rng = np.random.default_rng(seed + 10)
  counts = _counts(seed, first, last)
  return dict(h=rng.normal(size=(T, D)).astype(np.float32),
              ids=_ids(counts, T, seed + 1),
              keys=(0.3 * rng.normal(size=(ROWS, D))).astype(np.float32),
              values=rng.normal(size=(ROWS, E)).astype(np.float32),
              offsets=_offsets(counts), counts=counts)


def ref_lookup(h, ids, keys, values, offsets, counts, scale=1.0):
  """numpy float64, one token at a time: (read [T, e], entropy [T])."""
  reads, ents = [], []
  for x, t in zip(h.astype(np.float64), ids):
    rows = slice(offsets[t], offsets[t] + counts[t])
    z = scale * keys[rows].astype(np.float64) @ x
    p = np.exp(z - z.max())
    p /= p.sum()
    reads.append(p @ values[rows].astype(np.float64))
    ents.append(-np.sum(p * np.log(p)))
  return np.stack(reads), np.array(ents)


def jnp_ref_lookup(h, ids, keys, values, offsets, counts, scale=1.0):
  """The same in jnp, to differentiate: every token scores the whole table and
  a mask keeps its own rows (a large finite negative, so masked p = 0 exactly
  and p log p = 0 without NaN in the gradient)."""
  rows = np.arange(keys.shape[0])
  own = (rows >= offsets[ids][:, None]) & (rows < (offsets + counts)[ids][:, None])
  hi = jax.lax.Precision.HIGHEST
  z = jnp.where(own, scale * jnp.dot(h, keys.T, precision=hi), -1e9)
  logp = jax.nn.log_softmax(z, axis=-1)
  p = jnp.exp(logp)
  return jnp.dot(p, values, precision=hi), -jnp.sum(p * logp, axis=-1)


def _objective(read, ent):
  """A scalar that depends on every output element."""
  proj = jnp.cos(jnp.arange(read.size, dtype=jnp.float32).reshape(read.shape))
  return jnp.sum(read * proj) + jnp.sum(ent * jnp.sin(jnp.arange(ent.size) + 1.0))


# Table parts at cuts that split some ids' rows; the last part only holds rows
# of ids the batch of the combine test never uses.
CUTS = (0, 101, 180, ROWS)


def _split_lookup(h, ids, keys, values, offsets, counts, path):
  parts = [l3_lookup.lookup_partials(h, ids, keys[a:b], values[a:b], offsets, counts,
                                     max_rows=K, path=path, row_start=a)
           for a, b in zip(CUTS[:-1], CUTS[1:])]
  return parts, l3_lookup.finalize(l3_lookup.combine(parts))


# Module-level jits: every test below uses T tokens, so each path compiles once.
@functools.partial(jax.jit, static_argnames="path")
def _lookup(h, ids, keys, values, offsets, counts, scale, *, path):
  return l3_lookup.lookup(h, ids, keys, values, offsets, counts, max_rows=K, path=path,
                          scale=scale)


@functools.partial(jax.jit, static_argnames=("path", "tied", "split"))
def _lookup_grads(h, ids, keys, values, offsets, counts, *, path, tied=False, split=False):
  """d objective / d (h, keys, values), and the outputs; tied passes keys as the
  values too; split runs the lookup over the CUTS parts and returns them too."""
  def loss(h, keys, values):
    args = (h, ids, keys, keys if tied else values, offsets, counts)
    if split:
      parts, out = _split_lookup(*args, path)
    else:
      parts, out = None, l3_lookup.lookup(*args, max_rows=K, path=path)
    return _objective(*out), (parts, out)
  grads, (parts, out) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(h, keys, values)
  return (grads, out, parts) if split else grads


def _ref_grads(case, tied):
  ids, offsets, counts = case["ids"], case["offsets"], case["counts"]

  def loss(h, keys, values):
    return _objective(*jnp_ref_lookup(h, ids, keys, keys if tied else values, offsets, counts))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(case["h"], case["keys"], case["values"])


def _value_cases():
  """Two allocations (first id K rows and last 1, then the reverse), and two
  extreme batches: only one-row ids; every token the same K-row id."""
  for seed, (first, last) in enumerate([(K, 1), (1, K)]):
    yield _case(seed, first=first, last=last)
  case = _case(3)
  yield {**case, "ids": np.resize(np.flatnonzero(case["counts"] == 1), T).astype(np.int32)}
  yield {**case, "ids": np.full(T, 1, np.int32)}


@pytest.mark.parametrize("path", PATHS)
def test_lookup_equals_reference(path):
  for case in _value_cases():
    for scale in (1.0, 0.4):
      read, ent = _lookup(*case.values(), scale, path=path)
      ref_read, ref_ent = ref_lookup(*case.values(), scale=scale)
      np.testing.assert_allclose(read, ref_read, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)
      # Entropy is 0 for one-row ids (up to rounding) and at most log(count).
      c = case["counts"][case["ids"]]
      assert np.all(np.abs(ent[c == 1]) < 1e-6)
      assert np.all(ent <= np.log(c) + 1e-5) and np.all(ent[c > 1] > 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tied", [False, True])
def test_lookup_gradients_equal_reference(path, tied):
  case = _case(2)
  if tied:
    case["values"] = case["keys"]
  got = _lookup_grads(*case.values(), path=path, tied=tied)
  want = _ref_grads(case, tied)
  for name, g, w in zip(("h", "keys", "values"), got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)
  assert np.abs(np.asarray(got[1])).max() > 0
  if not tied:
    # Rows no token of the batch owns get exactly zero gradient.
    owned = np.zeros(ROWS, bool)
    for t in case["ids"]:
      owned[case["offsets"][t]:case["offsets"][t] + case["counts"][t]] = True
    assert np.all(np.asarray(got[2])[~owned] == 0) and np.all(np.asarray(got[2])[owned] != 0)


@pytest.mark.parametrize("path", PATHS)
def test_combine_of_split_table_equals_unsplit(path):
  case = _case(4)
  ends = case["offsets"][case["ids"]] + case["counts"][case["ids"]]
  case["ids"] = np.where(ends > CUTS[-2], 1, case["ids"]).astype(np.int32)
  split, (read, ent), parts = _lookup_grads(*case.values(), path=path, split=True)
  ref_read, ref_ent = ref_lookup(*case.values())
  np.testing.assert_allclose(read, ref_read, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)
  # Tokens with no rows in a part: s = u = numer = 0 there, nothing non-finite.
  assert np.all(np.asarray(parts[-1].s) == 0) and np.any(np.asarray(parts[0].s) == 0)
  for p in parts:
    for leaf in p:
      assert np.isfinite(np.asarray(leaf)).all()
    none = np.asarray(p.s) == 0
    assert np.all(np.asarray(p.numer)[none] == 0) and np.all(np.asarray(p.u)[none] == 0)
  # Gradients through the merge equal those of the unsplit lookup.
  whole = _lookup_grads(*case.values(), path=path)
  for name, g, w in zip(("h", "keys", "values"), split, whole):
    assert np.isfinite(np.asarray(g)).all(), name
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_offsets_from_counts():
  np.testing.assert_array_equal(l3_lookup.offsets_from_counts([3, 1, 2, 5]), [0, 3, 4, 6])


# --- the layer ---------------------------------------------------------------


def _cfg(path="padded", **l3):
  c = base_config()
  c.model.d_model = D
  c.l3.rows, c.l3.max_rows_per_token, c.l3.emb_dim, c.l3.up_dim = ROWS, K, E, 16
  c.l3.init_std, c.l3.path = 0.3, path
  for k, v in l3.items():
    c.l3[k] = v
  return c


def _layer(cfg, seed=0, mix_std=0.0):
  layer = L3Layer(cfg, 2, _counts(), nnx.Rngs(params=seed))
  if mix_std:
    rng = np.random.default_rng(seed)
    for var, std in ((layer.w_mix, mix_std), (layer.up_norm.bias, 0.1)):
      var[...] = jnp.asarray(std * rng.normal(size=var.shape), var[...].dtype)
  return layer


def _inputs(batch=8, seq=4, seed=5):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, seq, D)), jnp.float32)
  ids = _ids(_counts(), batch * seq, seed).reshape(batch, seq)
  return x, jnp.asarray(ids)


def ref_layer(layer, x, ids, eps, scale=1.0):
  """numpy float64 layer: RMSNorm, per-token lookup, W_up, LayerNorm, concat, W_mix."""
  p = lambda v: np.asarray(v[...], np.float64)
  x = np.asarray(x, np.float64).reshape(-1, D)
  h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * p(layer.norm.scale)
  keys = p(layer.keys)
  values = keys if layer.values is None else p(layer.values)
  counts = _counts()
  read, ent = ref_lookup(h, np.asarray(ids).reshape(-1), keys, values, _offsets(counts),
                         counts, scale)
  up = read @ p(layer.w_up)
  mu, var = up.mean(-1, keepdims=True), up.var(-1, keepdims=True)
  up = (up - mu) / np.sqrt(var + eps) * p(layer.up_norm.scale) + p(layer.up_norm.bias)
  y = np.concatenate([up, h], axis=-1) @ p(layer.w_mix)
  return y.reshape(*np.shape(ids), D), ent


def test_new_layer_is_identity_and_trains_w_mix():
  cfg = _cfg()
  layer = _layer(cfg)
  x, ids = _inputs()
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params):
    y, aux = nnx.merge(graphdef, params, rest)(x, token_ids=ids)
    proj = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
    return jnp.sum(y * proj), (y, aux)

  (_, (y, aux)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert y.shape == x.shape and np.all(np.asarray(y) == 0)
  assert set(aux) == {"l3_entropy/after_02", "l3_entropy_norm/after_02"}
  gw = np.asarray(g["w_mix"][...])
  # Both halves of W_mix (read side and h side) get a gradient.
  assert np.abs(gw[:cfg.l3.up_dim]).max() > 0 and np.abs(gw[cfg.l3.up_dim:]).max() > 0


def test_layer_state_and_tied_tables():
  cfg, tied_cfg = _cfg(), _cfg(tie_kv=True, emb_dim=D)
  layer, tied = _layer(cfg), _layer(tied_cfg)
  n = lambda m: sum(v.size for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert tied.values is None
  assert n(layer) - n(tied) == ROWS * E + (E - D) * cfg.l3.up_dim
  # The index is state beside the params, int32, and not a Param.
  index = nnx.state(layer, L3Index)
  np.testing.assert_array_equal(index["counts"][...], _counts())
  np.testing.assert_array_equal(index["offsets"][...], _offsets(_counts()))
  assert index["offsets"][...].dtype == jnp.int32
  assert "offsets" not in nnx.state(layer, nnx.Param)
  with pytest.raises(ConfigError, match="emb_dim"):
    _layer(_cfg(tie_kv=True, emb_dim=E))
  with pytest.raises(ConfigError, match="sum"):
    L3Layer(cfg, 2, np.ones(VOCAB, int), nnx.Rngs(params=0))
  bad = _counts()
  bad[0], bad[7] = K + 1, bad[7] - 1
  with pytest.raises(ConfigError, match="max_rows_per_token"):
    L3Layer(cfg, 2, bad, nnx.Rngs(params=0))


@pytest.mark.parametrize("path, tie_kv, scale_scores",
                         [("padded", False, False), ("sorted", True, True)])
def test_layer_equals_naive_reference(path, tie_kv, scale_scores):
  cfg = _cfg(path, tie_kv=tie_kv, scale_scores=scale_scores,
             **({"emb_dim": D} if tie_kv else {}))
  layer = _layer(cfg, seed=1, mix_std=0.2)
  x, ids = _inputs()
  y, aux = jax.jit(lambda x, ids: layer(x, token_ids=ids))(x, ids)
  ref_y, ref_ent = ref_layer(layer, x, ids, cfg.model.norm_eps,
                             1 / math.sqrt(D) if scale_scores else 1.0)
  np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-5)
  c = _counts()[np.asarray(ids).reshape(-1)]
  np.testing.assert_allclose(aux["l3_entropy/after_02"], ref_ent.mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["l3_entropy_norm/after_02"],
                             np.mean(ref_ent[c > 1] / np.log(c[c > 1])), rtol=1e-5)


@pytest.mark.parametrize("path, tie_kv", [("padded", False), ("sorted", True)])
def test_row_split_tables_equal_single_device(path, tie_kv, monkeypatch):
  calls = []
  real = l3_module.l3_lookup_parallel
  monkeypatch.setattr(l3_module, "l3_lookup_parallel",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  cfg = _cfg(path, tie_kv=tie_kv, **({"emb_dim": D} if tie_kv else {}))
  x, ids = _inputs()
  ref = loss_and_grads(cfg, _layer(cfg, seed=2, mix_std=0.2), x, token_ids=ids)
  assert not calls
  cfg.mesh.data, cfg.mesh.expert = 2, 4
  mesh = sharding.make_mesh(cfg.mesh)
  assert dict(mesh.shape) == dict(data=2, fsdp=1, expert=4, tensor=1)
  got = loss_and_grads(cfg, _layer(cfg, seed=2, mix_std=0.2), x, mesh=mesh, token_ids=ids)
  assert calls, "the layer did not take the row-split (l3_parallel) path"
  assert_same_layer_results(got, ref)
  gp = got[4]
  # Not vacuous: the tables get gradients on more than one shard's rows.
  gk = np.abs(np.asarray(gp["keys"])).reshape(4, ROWS // 4, D).max(axis=(1, 2))
  assert np.sum(gk > 0) >= 2
