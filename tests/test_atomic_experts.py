"""OmniMoE and PEER atomic experts against the naive references of atomic_reference.py.

  * product-key top-k (product_router.py) == full-grid top-k == a numpy full sort,
    scores, ids and gradients, for k < sqrt(N), k = sqrt(N), k > sqrt(N), k = N, k = 1;
  * the two atomic expert paths (atomic_experts.py) == a float64 loop, values and
    gradients (hand-written backward), with duplicate ids, one expert for every
    token, "no expert" ids >= N, k = 1, SiLU and (tanh) GELU;
  * the OmniMoE layer == the per-token reference in train and eval mode, with the
    PyTorch BatchNorm running-stat update; gradients of every parameter and the
    input == jax.grad of the (jnp) reference, for both paths;
    gates are not renormalised;
  * the PEER layer == its reference, with and without query BatchNorm, 1 and 2 heads;
  * the "omnimoe" / "peer" budgets count exactly the built parameters, and the
    presets match configs/dense.py at equal active FFN parameters;
  * bad atomic configs stop in validate() with one sentence.
"""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax.budget import model_budget
from moejax.errors import ConfigError
from moejax.model import sublayers
from moejax.papers.omnimoe.atomic_experts import atomic_expert_sorted, atomic_gather
from moejax.papers.omnimoe.product_router import full_grid_topk, product_topk
from tests import atomic_reference as ref
from tests.helpers import tiny_config

D = 16  # d_model of the layer tests
PATHS = {"gather": atomic_gather, "expert_sorted": atomic_expert_sorted}


# --------------------------------------------------------------------------- #
# 1. Product-key top-k
# --------------------------------------------------------------------------- #

def _ab(seed, num_tokens, n):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(num_tokens, n)).astype(np.float32),
          rng.normal(size=(num_tokens, n)).astype(np.float32))


TOPK_CASES = [(8, 3), (4, 4), (4, 8), (5, 1), (3, 9), (6, 20)]  # (n, k)


@pytest.mark.parametrize("n, k", TOPK_CASES, ids=[f"n{n}_k{k}" for n, k in TOPK_CASES])
def test_product_topk_equals_full_grid_and_numpy_sort(n, k):
  a, b = _ab(n * 100 + k, 24, n)
  want_scores, want_ids, margin = ref.grid_topk_ref(a, b, k)
  assert margin.min() > 1e-5  # the float64 selection is unambiguous in float32
  results = {name: jax.device_get(fn(jnp.asarray(a), jnp.asarray(b), k))
             for name, fn in (("product", product_topk), ("full", full_grid_topk))}
  for name, (scores, ids) in results.items():
    assert scores.shape == (24, k) and ids.shape == (24, k), name
    assert ids.dtype == np.int32, name
    np.testing.assert_array_equal(ids, want_ids, err_msg=name)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-6, err_msg=name)
  np.testing.assert_array_equal(results["product"][1], results["full"][1])
  np.testing.assert_array_equal(results["product"][0], results["full"][0])


@pytest.mark.parametrize("n, k", TOPK_CASES, ids=[f"n{n}_k{k}" for n, k in TOPK_CASES])
def test_product_topk_gradients_equal_full_grid(n, k):
  a, b = _ab(n * 7 + k, 16, n)
  w = np.random.default_rng(1).normal(size=(16, k)).astype(np.float32)

  def grads(fn):
    return jax.device_get(jax.jit(jax.grad(lambda a, b: jnp.sum(fn(a, b, k)[0] * w), (0, 1)))(
        jnp.asarray(a), jnp.asarray(b)))

  ga_p, gb_p = grads(product_topk)
  ga_f, gb_f = grads(full_grid_topk)
  _, ids, _ = ref.grid_topk_ref(a, b, k)
  want_a, want_b = ref.grid_topk_grads_ref(ids, n, w)
  for got_a, got_b in ((ga_p, gb_p), (ga_f, gb_f)):
    np.testing.assert_allclose(got_a, want_a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ga_p, ga_f, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gb_p, gb_f, rtol=1e-6, atol=1e-6)


def test_product_topk_with_ties_selects_equally_good_cells():
  # Integer-valued scores tie a lot: the ids may differ ("up to ties") but every
  # selected cell must really have the reported score, ids must be distinct, and
  # the sorted scores must equal the full sort's.
  rng = np.random.default_rng(5)
  n, k = 4, 6
  a = rng.integers(0, 3, size=(32, n)).astype(np.float32)
  b = rng.integers(0, 3, size=(32, n)).astype(np.float32)
  want_scores, _, _ = ref.grid_topk_ref(a, b, k)
  for fn in (product_topk, full_grid_topk):
    scores, ids = jax.device_get(fn(jnp.asarray(a), jnp.asarray(b), k))
    np.testing.assert_array_equal(scores, want_scores)
    cell = a[np.arange(32)[:, None], ids // n] + b[np.arange(32)[:, None], ids % n]
    np.testing.assert_array_equal(cell, scores)
    assert all(len(set(row)) == k for row in ids.tolist())


# --------------------------------------------------------------------------- #
# 2. Atomic expert paths
# --------------------------------------------------------------------------- #

ID_CASES = ["random", "one_expert", "same_set", "no_expert", "all_none", "k1", "dup_in_token"]


# Every ragged case with SiLU (OmniMoE); GELU (PEER) on the ones that differ most.
ACT_CASES = [(c, "silu") for c in ID_CASES] + [
    (c, "gelu") for c in ("random", "no_expert", "dup_in_token")]


@pytest.mark.parametrize("case, activation", ACT_CASES, ids=[f"{c}-{a}" for c, a in ACT_CASES])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_atomic_paths_equal_loop_values_and_grads(path, case, activation):
  rng = np.random.default_rng(zlib.crc32(f"{case}/{activation}".encode()))
  num_tokens, num_experts, idx = ref.ragged_ids(case, rng)
  d = 12
  k = idx.shape[1]
  x = rng.normal(size=(num_tokens, d)).astype(np.float32)
  gates = rng.uniform(0.1, 1.0, size=(num_tokens, k)).astype(np.float32)
  up = (0.5 * rng.normal(size=(num_experts, d))).astype(np.float32)
  down = rng.normal(size=(num_experts, d)).astype(np.float32)
  dy = rng.normal(size=(num_tokens, d)).astype(np.float32)
  fn = PATHS[path]
  idx_j = jnp.asarray(idx, jnp.int32)

  def loss(x, gates, up, down):
    y = fn(x, idx_j, gates, up, down, activation=activation)
    return jnp.sum(y * dy), y

  (_, y), got = jax.device_get(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3),
                                                          has_aux=True))(
      jnp.asarray(x), jnp.asarray(gates), jnp.asarray(up), jnp.asarray(down)))
  want = ref.atomic_ref(x, idx, gates, up, down, activation)
  assert y.shape == (num_tokens, d) and y.dtype == np.float32
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  if case == "all_none":
    assert not y.any()
  want_g = ref.atomic_grads_ref(x, idx, gates, up, down, dy, activation)
  for name, g, w in zip(("x", "gates", "expert_in", "expert_out"), got, want_g):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


def test_gelu_is_the_tanh_approximation():
  # jax.nn.gelu defaults to approximate=True; PyTorch's F.gelu (used by PEER
  # reference code) is the exact erf form. Pin which one "gelu" means here.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 8)).astype(np.float32)
  up = (0.6 * rng.normal(size=(4, 8))).astype(np.float32)
  down = rng.normal(size=(4, 8)).astype(np.float32)
  idx = np.array([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2], [1, 3]])
  gates = np.ones((6, 2), np.float32)
  y = np.asarray(atomic_gather(jnp.asarray(x), jnp.asarray(idx, jnp.int32), jnp.asarray(gates),
                               jnp.asarray(up), jnp.asarray(down), activation="gelu"))
  tanh_ref = ref.atomic_ref(x, idx, gates, up, down, "gelu")
  erf_ref = ref.atomic_ref(x, idx, gates, up, down, "gelu_erf")
  assert np.max(np.abs(tanh_ref - erf_ref)) > 1e-4  # the two forms are distinguishable
  np.testing.assert_allclose(y, tanh_ref, rtol=1e-6, atol=2e-6)


# --------------------------------------------------------------------------- #
# Layer helpers
# --------------------------------------------------------------------------- #

def _cfg(sublayer, **atomic):
  overrides = {"model.sublayer": sublayer, "model.d_model": D, "atomic.num_experts": 64,
               "atomic.top_k": 4, "atomic.shared_ffn_dim": 24, "atomic.peer_query_dim": 8}
  overrides.update({f"atomic.{k}": v for k, v in atomic.items()})
  return tiny_config(**overrides)


_SCALES = {"router_x": 1.0, "router_y": 1.0, "query": 0.5, "keys_x": 1.0, "keys_y": 1.0,
           "expert_in": 0.5, "expert_out": 2.0, "w_gate": 0.3, "w_up": 0.3, "w_down": 0.1}


def _build(cfg, seed=0):
  """The layer with every parameter redrawn at O(1) scale, so the router, the
  routed experts and the shared branch all move the output visibly."""
  layer = sublayers.build(cfg, 0, nnx.Rngs(params=seed))
  state = nnx.state(layer, nnx.Param)
  pure = nnx.to_pure_dict(state)
  rng = np.random.default_rng(seed + 11)

  def redraw(path, v):
    name = path[-1].key
    return jnp.asarray(_SCALES[name] * rng.normal(size=v.shape), v.dtype)

  pure = jax.tree_util.tree_map_with_path(redraw, pure)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(layer, state)
  return layer


def _flat_params(layer) -> dict:
  """Module parameters as float64 numpy, under the reference's names."""
  pure = jax.device_get(nnx.to_pure_dict(nnx.state(layer, nnx.Param)))
  out = {k: ref.f64(v) for k, v in pure.items() if k != "shared"}
  shared = pure.get("shared") or {}
  for k in ("w_gate", "w_up", "w_down"):
    out[k] = ref.f64(shared[k]) if k in shared else None
  return out


# Jitted layer calls; nnx.jit writes the BatchNorm statistics back to the layer.
_call = nnx.jit(lambda m, x, train: m(x, train=train), static_argnames="train")
_route = nnx.jit(lambda m, tokens, train: m.route(tokens, train=train), static_argnames="train")


def _check_shapes(p, cfg):
  """The layer holds the parameters of the equations, with their shapes."""
  a = cfg.atomic
  n = int(round(a.num_experts ** 0.5))
  want = {"expert_in": (a.num_experts, D), "expert_out": (a.num_experts, D),
          "w_gate": (D, a.shared_ffn_dim), "w_up": (D, a.shared_ffn_dim),
          "w_down": (a.shared_ffn_dim, D)}
  if cfg.model.sublayer == "omnimoe":
    want.update(router_x=(D, n), router_y=(D, n))
  else:
    qdim = a.peer_query_dim or D
    want.update(query=(D, a.peer_heads * qdim), keys_x=(n, qdim // 2), keys_y=(n, qdim // 2))
  assert {k: None if v is None else v.shape for k, v in p.items()} == want


def _x(seed, batch=2, seq=8, d=D):
  return np.random.default_rng(seed).normal(size=(batch, seq, d)).astype(np.float32)


def _stats(norm):
  return np.asarray(norm.running_mean[...]), np.asarray(norm.running_var[...])


def _set_stats(norm, rng):
  n = norm.running_mean[...].shape[0]
  norm.running_mean[...] = jnp.asarray(rng.normal(size=n), jnp.float32)
  norm.running_var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=n), jnp.float32)


def _assert_routed_matters(info, y_ref):
  # The routed branch is a visible part of the output, so dropping or
  # mis-weighting it fails the comparison.
  assert np.linalg.norm(info["routed"]) > 0.1 * np.linalg.norm(y_ref)


# --------------------------------------------------------------------------- #
# 3-4. OmniMoE layer
# --------------------------------------------------------------------------- #

# (N, k, router): k < sqrt(N) with both routers; k > sqrt(N) (the product router's
# candidate set is the whole grid) with the product router.
OMNI_CASES = [(64, 4, "product"), (64, 4, "full"), (16, 8, "product")]


@pytest.mark.parametrize("path", ["gather", "expert_sorted"])
@pytest.mark.parametrize("num_experts, top_k, router", OMNI_CASES,
                         ids=[f"N{n}k{k}-{r}" for n, k, r in OMNI_CASES])
def test_omnimoe_train_equals_reference_and_updates_running_stats(num_experts, top_k, router,
                                                                  path):
  cfg = _cfg("omnimoe", num_experts=num_experts, top_k=top_k, router=router, path=path)
  layer = _build(cfg)
  rng = np.random.default_rng(3)
  _set_stats(layer.norm_x, rng)  # non-trivial old statistics test the (1 - m) term
  _set_stats(layer.norm_y, rng)
  old_x, old_y = _stats(layer.norm_x), _stats(layer.norm_y)
  x = _x(1)
  p = _flat_params(layer)
  _check_shapes(p, cfg)
  y_ref, info = ref.omnimoe_ref(ref.f64(x).reshape(-1, D), p, top_k=top_k,
                                eps=cfg.atomic.bn_eps)
  assert info["margin"].min() > 1e-5
  _assert_routed_matters(info, y_ref)

  y, aux = _call(layer, jnp.asarray(x), True)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), y_ref, rtol=1e-4, atol=1e-5)
  m = cfg.atomic.bn_momentum
  for norm, old, key in ((layer.norm_x, old_x, "x"), (layer.norm_y, old_y, "y")):
    want_mean, want_var = ref.running_update_ref(*old, info[f"mean_{key}"],
                                                  info[f"var_{key}"], m)
    got_mean, got_var = _stats(norm)
    np.testing.assert_allclose(got_mean, want_mean, rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(got_var, want_var, rtol=1e-5, atol=1e-6, err_msg=key)
  # aux metrics from the reference's selection
  counts = np.bincount(info["ids"].ravel(), minlength=num_experts)
  np.testing.assert_allclose(aux["dead_fraction"], np.mean(counts == 0), rtol=1e-6)
  np.testing.assert_allclose(aux["gate_mass"], info["gates"].sum(-1).mean(), rtol=1e-5)


@pytest.mark.parametrize("path", ["gather", pytest.param("expert_sorted", marks=pytest.mark.slow)])
def test_omnimoe_eval_uses_running_stats_and_leaves_them(path):
  cfg = _cfg("omnimoe", path=path)
  layer = _build(cfg, seed=1)
  rng = np.random.default_rng(4)
  _set_stats(layer.norm_x, rng)
  _set_stats(layer.norm_y, rng)
  before = [_stats(layer.norm_x), _stats(layer.norm_y)]
  x = _x(2)
  p = _flat_params(layer)
  running = dict(mean_x=ref.f64(before[0][0]), var_x=ref.f64(before[0][1]),
                 mean_y=ref.f64(before[1][0]), var_y=ref.f64(before[1][1]))
  y_ref, info = ref.omnimoe_ref(ref.f64(x).reshape(-1, D), p, top_k=4,
                                eps=cfg.atomic.bn_eps, running=running)
  assert info["margin"].min() > 1e-5
  _assert_routed_matters(info, y_ref)
  # The train-mode answer differs (batch statistics != these running ones).
  y_train_ref, _ = ref.omnimoe_ref(ref.f64(x).reshape(-1, D), p, top_k=4,
                                   eps=cfg.atomic.bn_eps)
  assert np.max(np.abs(y_train_ref - y_ref)) > 1e-2

  y, _ = _call(layer, jnp.asarray(x), False)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), y_ref, rtol=1e-4, atol=1e-5)
  after = [_stats(layer.norm_x), _stats(layer.norm_y)]
  for (m0, v0), (m1, v1) in zip(before, after):
    np.testing.assert_array_equal(m0, m1)
    np.testing.assert_array_equal(v0, v1)


def test_omnimoe_gates_are_not_renormalised():
  cfg = _cfg("omnimoe", num_experts=64, top_k=4)
  layer = _build(cfg, seed=2)
  x = _x(5).reshape(-1, D)
  p = _flat_params(layer)
  _, info = ref.omnimoe_ref(ref.f64(x), p, top_k=4, eps=cfg.atomic.bn_eps)
  # exp of the log-probabilities is a joint distribution over all N cells ...
  np.testing.assert_allclose(np.exp(info["log_probs"]).sum(-1), 1.0, rtol=1e-12)
  gates, idx = jax.device_get(_route(layer, jnp.asarray(x), True))
  np.testing.assert_array_equal(idx, info["ids"])
  # ... and the gates are the exp of the k selected log-probabilities, as they are.
  top_lp = np.sort(info["log_probs"], axis=-1)[:, ::-1][:, :4]
  np.testing.assert_allclose(gates, np.exp(top_lp), rtol=1e-5)
  sums = gates.sum(-1)
  np.testing.assert_allclose(sums, np.exp(top_lp).sum(-1), rtol=1e-5)
  assert np.all(sums < 1.0)
  assert np.all(sums < 0.95)  # far from the renormalised sum of 1 at k = 4 of 64


def _omni_loss_and_grads(layer, x, proj):
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  # The BatchNorm statistics (rest) are written in train mode, so they must be
  # traced at the level of the grad too (their own gradient is dropped).
  def loss_fn(params, rest, x):
    y, _ = nnx.merge(graphdef, params, rest)(x, train=True)
    return jnp.sum(y * proj)

  loss, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))(params, rest,
                                                                        jnp.asarray(x))
  return jax.device_get((loss, nnx.to_pure_dict(grads[0]), grads[2]))


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    elif v is not None:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def _ref_grads(ref_fn, p, x, proj, ids, **kw):
  """jax.grad of the jnp reference with the float64 selection held fixed."""
  names = [k for k, v in p.items() if v is not None]

  def loss(pj, xj):
    y, _ = ref_fn(xj, {**{k: None for k in p}, **pj}, select=ids, **kw)
    return jnp.sum(y * proj)

  pj = {k: jnp.asarray(p[k], jnp.float32) for k in names}
  value, (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
      pj, jnp.asarray(x, jnp.float32))
  return float(value), {k: np.asarray(v) for k, v in gp.items()}, np.asarray(gx)


_SHARED_NAMES = {"w_gate": "shared/w_gate", "w_up": "shared/w_up", "w_down": "shared/w_down"}


def test_omnimoe_gradients_paths_agree_and_equal_reference():
  router = "product"  # the router only changes which ids are found, tested above
  x = _x(6)
  proj = np.cos(np.arange(x.size, dtype=np.float32)).reshape(-1, D)
  got = {}
  for path in ("gather", "expert_sorted"):
    cfg = _cfg("omnimoe", router=router, path=path)
    layer = _build(cfg, seed=3)
    got[path] = _omni_loss_and_grads(layer, x, proj.reshape(x.shape))
  p = _flat_params(layer)
  xt = ref.f64(x).reshape(-1, D)
  y_ref, info = ref.omnimoe_ref(xt, p, top_k=4, eps=cfg.atomic.bn_eps)
  assert info["margin"].min() > 1e-5
  ref_loss, want_p, want_x = _ref_grads(ref.omnimoe_ref, p, xt, proj, info["ids"], top_k=4,
                                        eps=cfg.atomic.bn_eps)
  np.testing.assert_allclose(ref_loss, np.sum(y_ref * proj), rtol=1e-4)  # jnp form == loops
  loss_g, gp_g, gx_g = got["gather"]
  loss_s, gp_s, gx_s = got["expert_sorted"]
  np.testing.assert_allclose(loss_g, np.sum(y_ref * proj), rtol=1e-4)
  np.testing.assert_allclose(loss_s, loss_g, rtol=1e-6)
  flat_g, flat_s = _flatten(gp_g), _flatten(gp_s)
  assert set(flat_g) == set(flat_s) == {_SHARED_NAMES.get(k, k) for k in want_p}
  np.testing.assert_allclose(gx_s, gx_g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gx_g.reshape(-1, D), want_x, rtol=1e-3, atol=1e-4)
  for name, want in want_p.items():
    key = _SHARED_NAMES.get(name, name)
    assert np.abs(want).max() > 0, name  # every parameter gets a gradient
    np.testing.assert_allclose(flat_s[key], flat_g[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(flat_g[key], want, rtol=1e-3, atol=1e-4, err_msg=key)


# --------------------------------------------------------------------------- #
# 5. PEER layer
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("query_bn, heads", [
    pytest.param(True, 2, id="bn-2"), pytest.param(False, 1, id="nobn-1"),
    pytest.param(True, 1, id="bn-1", marks=pytest.mark.slow),
    pytest.param(False, 2, id="nobn-2", marks=pytest.mark.slow)])
def test_peer_equals_reference(query_bn, heads):
  path = "expert_sorted" if heads == 2 else "gather"
  cfg = _cfg("peer", peer_heads=heads, peer_query_batchnorm=query_bn, path=path,
             num_experts=16 if heads == 2 else 64, top_k=4)
  layer = _build(cfg, seed=heads)
  x = _x(7)
  p = _flat_params(layer)
  _check_shapes(p, cfg)
  xt = ref.f64(x).reshape(-1, D)
  y_ref, info = ref.peer_ref(xt, p, top_k=4, heads=heads, query_bn=query_bn,
                             eps=cfg.atomic.bn_eps)
  assert info["margin"].min() > 1e-5
  _assert_routed_matters(info, y_ref)
  if query_bn:
    old = _stats(layer.query_norm)
  else:
    assert layer.query_norm is None
  y, aux = _call(layer, jnp.asarray(x), True)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), y_ref, rtol=1e-4, atol=1e-5)
  gates, idx = jax.device_get(_route(layer, jnp.asarray(xt, jnp.float32), True))
  np.testing.assert_array_equal(idx, info["ids"])
  np.testing.assert_allclose(gates, info["gates"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gates.reshape(-1, heads, 4).sum(-1), 1.0, rtol=1e-5)
  if query_bn:
    m = cfg.atomic.bn_momentum
    want_mean, want_var = ref.running_update_ref(*old, info["mean"], info["var"], m)
    # layer.route above ran a second train step on the same batch: apply it twice.
    want_mean, want_var = ref.running_update_ref(want_mean, want_var, info["mean"],
                                                 info["var"], m)
    got_mean, got_var = _stats(layer.query_norm)
    np.testing.assert_allclose(got_mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_var, want_var, rtol=1e-5, atol=1e-6)


def test_peer_eval_uses_running_stats():
  cfg = _cfg("peer", peer_heads=2, peer_query_batchnorm=True, num_experts=16)
  layer = _build(cfg, seed=4)
  _set_stats(layer.query_norm, np.random.default_rng(8))
  before = _stats(layer.query_norm)
  x = _x(9)
  p = _flat_params(layer)
  y_ref, info = ref.peer_ref(ref.f64(x).reshape(-1, D), p, top_k=4, heads=2, query_bn=True,
                             eps=cfg.atomic.bn_eps,
                             running=dict(mean=ref.f64(before[0]), var=ref.f64(before[1])))
  assert info["margin"].min() > 1e-5
  y, _ = _call(layer, jnp.asarray(x), False)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), y_ref, rtol=1e-4, atol=1e-5)
  after = _stats(layer.query_norm)
  np.testing.assert_array_equal(before[0], after[0])
  np.testing.assert_array_equal(before[1], after[1])


def test_peer_gradients_equal_reference():
  cfg = _cfg("peer", peer_heads=2, peer_query_batchnorm=True, num_experts=16)
  layer = _build(cfg, seed=5)
  x = _x(10)
  proj = np.cos(np.arange(x.size, dtype=np.float32)).reshape(-1, D)
  loss, gp, gx = _omni_loss_and_grads(layer, x, proj.reshape(x.shape))
  p = _flat_params(layer)
  xt = ref.f64(x).reshape(-1, D)
  y_ref, info = ref.peer_ref(xt, p, top_k=4, heads=2, query_bn=True, eps=cfg.atomic.bn_eps)
  assert info["margin"].min() > 1e-5
  ref_loss, want_p, want_x = _ref_grads(ref.peer_ref, p, xt, proj, info["ids"], top_k=4,
                                        heads=2, query_bn=True, eps=cfg.atomic.bn_eps)
  np.testing.assert_allclose(ref_loss, np.sum(y_ref * proj), rtol=1e-4)  # jnp form == loops
  np.testing.assert_allclose(loss, np.sum(y_ref * proj), rtol=1e-4)
  np.testing.assert_allclose(gx.reshape(-1, D), want_x, rtol=1e-3, atol=1e-4)
  flat = _flatten(gp)
  assert set(flat) == {_SHARED_NAMES.get(k, k) for k in want_p}
  for name, want in want_p.items():
    key = _SHARED_NAMES.get(name, name)
    assert np.abs(want).max() > 0, name
    np.testing.assert_allclose(flat[key], want, rtol=1e-3, atol=1e-4, err_msg=key)


# --------------------------------------------------------------------------- #
# 6. Budgets
# --------------------------------------------------------------------------- #

def _abstract(cfg):
  """The layer with shapes only (nothing is initialised)."""
  return nnx.eval_shape(lambda: sublayers.build(cfg, 0, nnx.Rngs(params=0)))


def _num_params(layer) -> int:
  return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(layer, nnx.Param)))


BUDGET_CASES = [
    ("omnimoe", dict(shared_ffn_dim=24)),
    ("omnimoe", dict(shared_ffn_dim=0, num_experts=16, top_k=8)),
    ("peer", dict(peer_heads=1, peer_query_dim=8)),
    ("peer", dict(peer_heads=2, peer_query_dim=0, shared_ffn_dim=0, num_experts=36)),
]


@pytest.mark.parametrize("sublayer, atomic", BUDGET_CASES,
                         ids=[f"{s}{i}" for i, (s, _) in enumerate(BUDGET_CASES)])
def test_budget_counts_the_built_parameters(sublayer, atomic):
  cfg = _cfg(sublayer, **atomic)
  layer = _abstract(cfg)
  budget = sublayers.get(sublayer).budget(cfg, 0)
  total = _num_params(layer)
  assert budget["params"] == total
  # Active: everything but the table rows a token does not select (heads x k of N).
  a = cfg.atomic
  heads = a.peer_heads if sublayer == "peer" else 1
  tables = math.prod(layer.expert_in.shape) + math.prod(layer.expert_out.shape)
  assert tables == 2 * a.num_experts * D
  assert budget["active_params"] == total - tables + 2 * heads * a.top_k * D


@pytest.mark.parametrize("preset", ["tiny", "peer_tiny", "small", "peer_small"])
def test_presets_match_dense_active_ffn_params(preset):
  from configs.dense import get_config as dense_config
  from configs.omnimoe import get_config
  cfg = get_config(preset)
  size = preset.rsplit("_", 1)[-1]
  dense = dense_config(size)
  per_layer = sublayers.get(cfg.model.sublayer).budget(cfg, 0)["active_params"]
  dense_per_layer = sublayers.get("dense").budget(dense, 0)["active_params"]
  assert per_layer == dense_per_layer == 3 * dense.model.d_model * dense.model.ffn_dim
  vocab = 2048
  assert (model_budget(cfg, vocab_size=vocab)["active_params"]
          == model_budget(dense, vocab_size=vocab)["active_params"])
  config_lib.validate(cfg, num_devices=1, check_data=False)
  # ... and the budget counts the real module's parameters.
  assert sublayers.get(cfg.model.sublayer).budget(cfg, 0)["params"] == _num_params(
      _abstract(cfg))


# --------------------------------------------------------------------------- #
# 7. Config validation
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("sublayer, overrides, devices, message", [
    ("omnimoe", {"atomic.num_experts": 15}, 1, "num_experts=15 must be a perfect square .* try 9 or 16"),
    ("peer", {"atomic.num_experts": 50}, 1, "num_experts=50 must be a perfect square"),
    ("omnimoe", {"atomic.num_experts": 16, "atomic.top_k": 17}, 1,
     "top_k=17 exceeds --config.atomic.num_experts=16"),
    ("omnimoe", {"atomic.router": "magic"}, 1, "router='magic' is not one of"),
    ("peer", {"atomic.path": "scatter"}, 1, "path='scatter' is not one of"),
    ("peer", {"atomic.peer_query_dim": 7}, 1, "is 7; it must be positive and even"),
    ("omnimoe", {"atomic.num_experts": 36, "mesh.expert": 8, "mesh.data": 1}, 8,
     "num_experts=36 is not divisible by the expert mesh axis"),
    ("peer", {"atomic.num_experts": 9, "atomic.top_k": 4, "mesh.expert": 2, "mesh.data": 4}, 8,
     "num_experts=9 is not divisible by the expert mesh axis"),
])
def test_bad_atomic_config_is_one_sentence(sublayer, overrides, devices, message):
  cfg = tiny_config(**{"model.sublayer": sublayer, **overrides})
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
    config_lib.validate(cfg, num_devices=devices, check_data=False)
  text = str(err.value)
  assert text.count(". ") <= 1 and "\n" not in text and text.endswith(".")


def test_good_atomic_configs_validate():
  for sublayer in ("omnimoe", "peer"):
    config_lib.validate(tiny_config(**{"model.sublayer": sublayer}), num_devices=1,
                        check_data=False)
  # An odd PEER query width only matters for PEER.
  config_lib.validate(tiny_config(**{"model.sublayer": "omnimoe", "atomic.peer_query_dim": 7}),
                      num_devices=1, check_data=False)
  config_lib.validate(tiny_config(**{"model.sublayer": "omnimoe", "atomic.num_experts": 64,
                                     "mesh.expert": 8, "mesh.data": 1}),
                      num_devices=8, check_data=False)
