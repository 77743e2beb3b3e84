"""Every dispatch backend against the per-token loop of tests/moe_reference.py.

Values and gradients (wrt x, w_gate, w_up, w_down, combine_weights) of each
backend, run in float32 under jit, are compared with the naive per-token loop
in float64 numpy, whose gradients are the backprop written out by hand; one
test checks that those equal jax.grad through the jnp version of the loop
(float64, via jax.enable_x64). The capacity backend with a small capacity
factor is compared with the GShard capacity reference, dropped-pair count
included. Then the MoE layer: dropless evaluation, dropped fraction in
training, shared experts.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.moe import dispatch
from moejax.model import sublayers
from tests import moe_reference as ref
from tests.helpers import tiny_config

D, F, E = 8, 6, 4  # shared by the cases, so one compiled backend serves every case of
T = 13             # a shape; T*k = 13, 26, 39 is a multiple of neither 4 nor 8

# name -> (tokens, top_k, kind)
CASES = {
    "random_k2": (T, 2, "random"),
    "random_k1": (T, 1, "random"),
    "random_k3": (T, 3, "random"),
    "empty_experts": (T, 2, "subset"),          # only experts 1 and 3 receive pairs
    "one_expert_k1": (T, 1, "one"),             # every token to expert 2
    "one_expert_both_slots": (T, 2, "one"),     # both slots of every token to expert 2
    "no_expert_pairs": (T, 2, "some_none"),     # ~1/3 of the pairs have id E
    "all_no_expert": (T, 2, "all_none"),
    "single_token": (1, 2, "random"),
}


def _make_idx(rng, num_tokens, k, kind):
  if kind == "random":
    return np.stack([rng.permutation(E)[:k] for _ in range(num_tokens)])
  if kind == "subset":
    return np.stack([rng.permutation([1, 3])[:k] for _ in range(num_tokens)])
  if kind == "one":
    return np.full((num_tokens, k), 2)
  if kind == "some_none":
    idx = np.stack([rng.permutation(E)[:k] for _ in range(num_tokens)])
    return np.where(rng.random(idx.shape) < 0.35, E, idx)
  if kind == "all_none":
    return np.full((num_tokens, k), E)
  raise ValueError(kind)


@functools.lru_cache(maxsize=None)
def _case(name):
  """float64 numpy inputs for one case (deterministic) and a cotangent for y."""
  num_tokens, k, kind = CASES[name]
  num_experts = E
  rng = np.random.default_rng(sorted(CASES).index(name))
  idx = _make_idx(rng, num_tokens, k, kind).astype(np.int32)
  x = rng.normal(size=(num_tokens, D))
  cw = rng.uniform(0.1, 1.0, size=(num_tokens, k))
  wg = rng.normal(size=(num_experts, D, F)) / np.sqrt(D)
  wu = rng.normal(size=(num_experts, D, F)) / np.sqrt(D)
  wd = rng.normal(size=(num_experts, F, D)) / np.sqrt(F)
  cot = rng.normal(size=(num_tokens, D))
  # Round the inputs to float32 so both sides see the same numbers.
  f32 = lambda a: np.asarray(a, np.float32).astype(np.float64)
  return dict(idx=idx, x=f32(x), cw=f32(cw), wg=f32(wg), wu=f32(wu), wd=f32(wd),
              cot=f32(cot))


def _args64(c):
  return [c[n] for n in ("x", "cw", "wg", "wu", "wd")]


def _ref_value_and_grads(c, idx):
  """Reference in float64 numpy: y and d<y, cot>/d(x, cw, wg, wu, wd), backprop
  written out by hand (moe_reference.per_token_moe_grads)."""
  x, cw, wg, wu, wd = _args64(c)
  y = ref.per_token_moe(x, idx, cw, wg, wu, wd)
  assert y.dtype == np.float64
  return y, list(ref.per_token_moe_grads(x, idx, cw, wg, wu, wd, c["cot"]))


def _jax_grad_ref(c, idx):
  """The same through jax.grad of the jnp per-token loop, in float64."""
  with jax.enable_x64(True):
    args = [jnp.asarray(a, jnp.float64) for a in _args64(c)]
    cot = jnp.asarray(c["cot"], jnp.float64)

    def f(x, cw, wg, wu, wd):
      return ref.per_token_moe(x, idx, cw, wg, wu, wd)

    y = f(*args)
    assert y.dtype == jnp.float64
    grads = jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2, 3, 4))(*args)
    return np.asarray(y), [np.asarray(g) for g in grads]


@functools.lru_cache(maxsize=None)
def _reference(name):
  c = _case(name)
  return _ref_value_and_grads(c, c["idx"])


@functools.lru_cache(maxsize=None)
def _capacity_ref(name, cf):
  c = _case(name)
  y, dropped = ref.capacity_reference(*_args64(c)[:1], c["idx"], *_args64(c)[1:],
                                      capacity_factor=cf)
  kept, dropped2 = ref.capacity_kept(c["idx"], E, cf)
  assert dropped2 == dropped
  _, grads = _ref_value_and_grads(c, np.where(kept, c["idx"], E))
  return y, grads, dropped


def test_reference_backprop_equals_jax_grad_of_the_loop():
  """The two references agree: hand-written backprop and jax.grad of the loop."""
  rng = np.random.default_rng(5)
  c = dict(x=rng.normal(size=(3, D)), cw=rng.uniform(size=(3, 2)),
           wg=rng.normal(size=(E, D, F)), wu=rng.normal(size=(E, D, F)),
           wd=rng.normal(size=(E, F, D)), cot=rng.normal(size=(3, D)))
  idx = np.array([[1, 3], [E, 1], [0, 1]])
  want_y, want_grads = _jax_grad_ref(c, idx)
  got_y, got_grads = _ref_value_and_grads(c, idx)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-12, atol=1e-12)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


@functools.lru_cache(maxsize=None)
def _compiled(backend, kw_items):
  """One jitted value-and-grad per backend setting (reused across equal shapes)."""
  kw = dict(kw_items)

  def loss(x, cw, wg, wu, wd, idx, cot):
    y, dropped = dispatch.expert_ffn(backend, x, idx, cw, wg, wu, wd, **kw)
    return jnp.sum(y * cot), (y, dropped)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def _backend_value_and_grads(backend, c, **kw):
  """float32 backend: (y, grads in the order x, cw, wg, wu, wd, dropped)."""
  args = [jnp.asarray(c[n], jnp.float32) for n in ("x", "cw", "wg", "wu", "wd", "cot")]
  idx = jnp.asarray(c["idx"])
  (_, (y, dropped)), grads = _compiled(backend, tuple(sorted(kw.items())))(
      *args[:5], idx, args[5])
  assert y.dtype == jnp.float32 and y.shape == c["x"].shape
  return np.asarray(y), [np.asarray(g) for g in grads], int(dropped)


def _close(got, want, rtol=2e-5):
  """Relative to the largest entry (float32 vs float64 summation order)."""
  scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-6)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


GRAD_NAMES = ("x", "combine_weights", "w_gate", "w_up", "w_down")

BACKEND_SETTINGS = {
    "sorted_auto_block": ("sorted", dict(block_size=0)),  # 16 here
    "sorted_block4": ("sorted", dict(block_size=4)),
    "sorted_block8": ("sorted", dict(block_size=8)),
    "ragged_dot": ("ragged_dot", {}),
    "capacity_large_cf": ("capacity", None),  # capacity_factor set per case: no drops
    "pallas": ("pallas", {}),  # Pallas kernels, interpret mode on CPU
}
# Interpret-mode kernels compile slowly: the pallas backend runs the edge cases only
# (tests/test_pallas_moe_ffn.py covers the kernels themselves in more cases).
PALLAS_CASES = ("random_k3", "empty_experts", "one_expert_both_slots", "no_expert_pairs",
                "all_no_expert", "single_token")


# Every (setting, case) pair, except that block 8 runs the top-2 cases only: one
# compile per (setting, shape) is most of this file's time.
DROPLESS_MATRIX = [(s, c) for s in sorted(BACKEND_SETTINGS) for c in sorted(CASES)
                   if (s != "sorted_block8" or CASES[c][:2] == (T, 2))
                   and (s != "pallas" or c in PALLAS_CASES)]


def _close_grads(got, want):
  for name, g, w in zip(GRAD_NAMES, got, want):
    try:
      _close(g, w)
    except AssertionError as e:
      raise AssertionError(f"gradient wrt {name}: {e}") from None


@pytest.mark.parametrize("setting,case", DROPLESS_MATRIX)
def test_dropless_backend_matches_per_token_loop(setting, case):
  backend, kw = BACKEND_SETTINGS[setting]
  c = _case(case)
  if kw is None:
    # C = ceil(cf * T * k / E) = T * k: no expert can overflow.
    kw = dict(capacity_factor=float(E))
  want_y, want_grads = _reference(case)
  got_y, got_grads, dropped = _backend_value_and_grads(backend, c, **kw)
  assert dropped == 0
  _close(got_y, want_y)
  _close_grads(got_grads, want_grads)
  # Pairs without an expert give nothing and get no gradient.
  none = c["idx"] == E
  assert np.all(got_grads[1][none] == 0)
  if none.all():
    assert np.all(got_y == 0)


def test_cases_cover_what_they_claim():
  """Guards the case table: empty experts, token counts off the block size."""
  c = _case("empty_experts")
  assert set(np.unique(c["idx"])) == {1, 3}
  assert all((CASES[n][0] * CASES[n][1]) % 4 for n in CASES if n != "single_token")
  c = _case("no_expert_pairs")
  assert c["idx"].max() == E and 0 < np.mean(c["idx"] == E) < 1


# (case, capacity factor); all but all_no_expert and single_token drop pairs.
CAPACITY_CASES = [(name, 0.5) for name in sorted(CASES)] + [("random_k2", 1.0)]


@pytest.mark.parametrize("case,cf", CAPACITY_CASES)
def test_capacity_backend_matches_gshard_reference(case, cf):
  c = _case(case)
  want_y, want_grads, want_dropped = _capacity_ref(case, cf)
  got_y, got_grads, got_dropped = _backend_value_and_grads("capacity", c,
                                                           capacity_factor=cf)
  assert got_dropped == want_dropped
  if case == "all_no_expert":
    assert want_dropped == 0
  elif case != "single_token":
    assert want_dropped > 0
  _close(got_y, want_y)
  _close_grads(got_grads, want_grads)


def test_capacity_reference_priority_by_hand():
  """The reference's GShard order, checked on a case worked out by hand."""
  # T=4, k=2, E=2, cf=0.5 -> C = ceil(0.5*8/2) = 2.
  idx = np.array([[0, 1], [0, 1], [1, 0], [0, 1]])
  kept, dropped = ref.capacity_kept(idx, 2, 0.5)
  # slot 0: t0->0 (0 had 0), t1->0 (1), t2->1 (0), t3->0 (2: drop)
  # slot 1: t0->1 (1 had 1), t1->1 (2: drop), t2->0 (3: drop), t3->1 (drop)
  np.testing.assert_array_equal(kept, [[1, 1], [1, 0], [1, 0], [0, 0]])
  assert dropped == 4


def test_capacity_backend_slot_priority_by_hand():
  """A later token's first choice beats an earlier token's second choice."""
  num_experts = 2
  # T=2, k=2, cf=0.5 -> C = 1. Token 0: (1, 0); token 1: (0, 1).
  # slot 0: t0->1 kept, t1->0 kept; slot 1: t0->0 dropped, t1->1 dropped.
  idx = jnp.array([[1, 0], [0, 1]], jnp.int32)
  x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  eye = jnp.stack([jnp.eye(2)] * num_experts)
  scale = jnp.array([1.0, 10.0])[:, None, None]
  w_gate = eye * 50.0  # silu(50 x) ~ 50 x for x >= 0
  w_up = eye
  w_down = eye * scale  # expert e multiplies by (1, 10)[e]
  cw = jnp.ones((2, 2))
  y, dropped = jax.jit(functools.partial(dispatch.expert_ffn, "capacity",
                                         capacity_factor=0.5))(
      x, idx, cw, w_gate, w_up, w_down)
  assert int(dropped) == 2
  # t0 keeps expert 1 only: 50 * x0^2 * 10; t1 keeps expert 0 only: 50 * x1^2 * 1.
  np.testing.assert_allclose(y, [[500.0, 0.0], [0.0, 50.0]], rtol=1e-5)


# --------------------------------------------------------------------------- #
# The MoE layer
# --------------------------------------------------------------------------- #

def _layer(**moe):
  overrides = {"model.sublayer": "moe", "model.d_model": 16, "moe.num_experts": 4,
               "moe.top_k": 2, "moe.expert_ffn_dim": 8}
  overrides.update({f"moe.{k}": v for k, v in moe.items()})
  cfg = tiny_config(**overrides)
  layer = sublayers.build(cfg, 0, nnx.Rngs(0))
  # A router decisive enough that float32 and float64 pick the same experts.
  rng = np.random.default_rng(7)
  layer.router.kernel[...] = jnp.asarray(rng.normal(size=layer.router.kernel.shape),
                                         jnp.float32)
  for w in (layer.w_gate, layer.w_up, layer.w_down):
    w[...] = jnp.asarray(rng.normal(size=w.shape) / 3, jnp.float32)
  return cfg, layer


def _x(batch=2, seq=7, d=16, seed=3):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, seq, d)), jnp.float32)


def _layer_reference(layer, cfg, x, capacity_factor=None):
  """The routed output of `layer` from the naive router and per-token loop."""
  tokens, _, idx, weights, _ = ref.route_layer(layer, cfg, x)
  ws = [np.asarray(w[...], np.float64) for w in (layer.w_gate, layer.w_up, layer.w_down)]
  if capacity_factor is None:
    y, dropped = ref.per_token_moe(tokens, idx, weights, *ws), 0
  else:
    y, dropped = ref.capacity_reference(tokens, idx, weights, *ws,
                                        capacity_factor=capacity_factor)
  return np.asarray(y).reshape(x.shape), dropped, idx


def test_moe_layer_eval_is_dropless_and_train_drops():
  cfg, layer = _layer(backend="capacity", capacity_factor=0.25)
  x = _x()
  num_pairs = x.shape[0] * x.shape[1] * cfg.moe.top_k

  y_eval, aux_eval = layer(x, train=False)
  dropless_ref, _, _ = _layer_reference(layer, cfg, x)
  _close(np.asarray(y_eval), dropless_ref, rtol=1e-4)
  assert float(aux_eval["dropped_fraction"]) == 0.0

  y_train, aux_train = layer(x, train=True)
  capacity_ref, dropped, _ = _layer_reference(layer, cfg, x, capacity_factor=0.25)
  assert dropped > 0
  np.testing.assert_allclose(float(aux_train["dropped_fraction"]), dropped / num_pairs,
                             rtol=1e-6)
  _close(np.asarray(y_train), capacity_ref, rtol=1e-4)
  assert not np.allclose(np.asarray(y_train), np.asarray(y_eval), atol=1e-3)

  # Evaluation equals the sorted backend's output on the same parameters.
  layer.backend = "sorted"
  y_sorted, aux_sorted = layer(x, train=False)
  np.testing.assert_allclose(np.asarray(y_eval), np.asarray(y_sorted), rtol=1e-5,
                             atol=1e-6)
  assert float(aux_sorted["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("backend", ["sorted", "ragged_dot"])
def test_moe_layer_train_matches_reference_for_dropless_backends(backend):
  cfg, layer = _layer(backend=backend)
  x = _x(seed=4)
  y, aux = layer(x, train=True)
  want, _, _ = _layer_reference(layer, cfg, x)
  _close(np.asarray(y), want, rtol=1e-4)
  assert float(aux["dropped_fraction"]) == 0.0


def test_moe_layer_shared_experts_add_a_dense_swiglu():
  cfg, layer = _layer(num_shared_experts=2)
  assert layer.shared is not None
  sh = layer.shared
  assert sh.w_gate.shape == (16, 2 * cfg.moe.expert_ffn_dim)
  rng = np.random.default_rng(11)
  for w in (sh.w_gate, sh.w_up, sh.w_down):
    w[...] = jnp.asarray(rng.normal(size=w.shape) / 3, jnp.float32)
  x = _x(seed=5)
  y, _ = layer(x, train=True)
  routed, _, _ = _layer_reference(layer, cfg, x)
  shared = ref.swiglu_ref(np.asarray(x).reshape(-1, 16), sh.w_gate[...], sh.w_up[...],
                          sh.w_down[...]).reshape(x.shape)
  assert np.max(np.abs(shared)) > 0.1 * np.max(np.abs(routed))  # the shared part matters
  _close(np.asarray(y), routed + shared, rtol=1e-4)
