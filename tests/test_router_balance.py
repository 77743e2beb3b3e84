"""Router, load-balancing losses, bias update and health metrics against the
naive references of tests/moe_reference.py, and the MoE layer's use of them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.model import load_balance as lb
from moejax.model import sublayers
from moejax.moe.router import RouterBias, route
from tests import moe_reference as ref
from tests.helpers import tiny_config


def _logits(num_tokens=11, num_experts=6, seed=0, scale=2.0):
  rng = np.random.default_rng(seed)
  return (scale * rng.normal(size=(num_tokens, num_experts))).astype(np.float32)


def _route(logits, **kw):
  r = route(jnp.asarray(logits), **kw)
  return (np.asarray(r.expert_idx), np.asarray(r.weights), np.asarray(r.logits),
          np.asarray(r.probs))


# --------------------------------------------------------------------------- #
# route()
# --------------------------------------------------------------------------- #

ROUTER_SETTINGS = [
    # (score_fn, top_k, renormalize, routed_scaling_factor)
    ("softmax", 2, True, 1.0),    # Mixtral
    ("softmax", 1, False, 1.0),   # Switch
    ("sigmoid", 3, True, 2.5),    # DeepSeek-V3
    ("sigmoid", 2, False, 1.0),
    ("softmax", 3, False, 1.5),
]


@pytest.mark.parametrize("score_fn,top_k,renormalize,scale", ROUTER_SETTINGS)
def test_route_matches_naive_routing(score_fn, top_k, renormalize, scale):
  logits = _logits(seed=top_k)
  idx, w, lg, probs = _route(logits, top_k=top_k, score_fn=score_fn,
                             renormalize=renormalize, routed_scaling_factor=scale)
  want_idx, want_w, want_probs = ref.naive_route(
      logits, top_k=top_k, score_fn=score_fn, renormalize=renormalize,
      routed_scaling_factor=scale)
  assert idx.dtype == np.int32 and w.dtype == np.float32
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(lg, logits)
  if renormalize:
    np.testing.assert_allclose(w.sum(-1), scale, rtol=1e-5)


def test_softmax_renormalised_is_softmax_over_the_selected_logits():
  """Mixtral: renormalised top-k softmax = softmax over the k largest logits."""
  logits = _logits(seed=3)
  idx, w, _, _ = _route(logits, top_k=2, score_fn="softmax", renormalize=True,
                        routed_scaling_factor=1.0)
  for t in range(logits.shape[0]):
    top = sorted(range(logits.shape[1]), key=lambda e: -logits[t, e])[:2]
    assert list(idx[t]) == top
    ex = [math.exp(float(logits[t, e])) for e in top]
    np.testing.assert_allclose(w[t], [v / sum(ex) for v in ex], rtol=1e-5)


def test_switch_top1_weight_is_the_full_softmax_probability():
  logits = _logits(seed=4)
  idx, w, _, _ = _route(logits, top_k=1, score_fn="softmax", renormalize=False,
                        routed_scaling_factor=1.0)
  for t in range(logits.shape[0]):
    e = int(np.argmax(logits[t]))
    assert idx[t, 0] == e
    p = math.exp(float(logits[t, e])) / sum(math.exp(float(v)) for v in logits[t])
    np.testing.assert_allclose(w[t, 0], p, rtol=1e-5)
    assert w[t, 0] < 1.0


@pytest.mark.parametrize("score_fn,renormalize", [("sigmoid", True), ("softmax", True),
                                                   ("softmax", False)])
def test_bias_changes_selection_not_weights(score_fn, renormalize):
  logits = _logits(num_tokens=16, seed=5)
  num_experts = logits.shape[1]
  bias = np.zeros(num_experts, np.float32)
  bias[num_experts - 1] = 5.0  # always chosen
  bias[0] = -5.0               # never chosen
  kw = dict(top_k=2, score_fn=score_fn, renormalize=renormalize,
            routed_scaling_factor=1.0)
  idx0, _, _, probs0 = _route(logits, **kw)
  idx, w, _, probs = _route(logits, bias=jnp.asarray(bias), **kw)
  assert np.all(idx[:, 0] == num_experts - 1) and not np.any(idx == 0)
  assert not np.array_equal(idx, idx0)
  np.testing.assert_array_equal(probs, probs0)  # probs ignore the bias too
  # Weights are the unbiased scores of the chosen experts.
  lg = logits.astype(np.float64)
  scores = (np.exp(lg) / np.exp(lg).sum(-1, keepdims=True) if score_fn == "softmax"
            else 1 / (1 + np.exp(-lg)))
  want = np.take_along_axis(scores, idx.astype(np.int64), axis=-1)
  if renormalize:
    want = want / want.sum(-1, keepdims=True)
  np.testing.assert_allclose(w, want, rtol=1e-5)
  want_idx, want_w, _ = ref.naive_route(logits, bias=bias, **kw)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(w, want_w, rtol=1e-5)


def test_small_bias_flips_some_choices_like_the_reference():
  """A DeepSeek-sized bias (comparable to score gaps) moves only some tokens."""
  logits = _logits(num_tokens=40, num_experts=8, seed=6, scale=1.0)
  bias = np.random.default_rng(6).normal(scale=0.1, size=8).astype(np.float32)
  kw = dict(top_k=2, score_fn="sigmoid", renormalize=True, routed_scaling_factor=2.5)
  idx0, _, _, _ = _route(logits, **kw)
  idx, w, _, _ = _route(logits, bias=jnp.asarray(bias), **kw)
  changed = np.any(idx != idx0, axis=-1)
  assert 0 < changed.sum() < len(changed)
  want_idx, want_w, _ = ref.naive_route(logits, bias=bias, **kw)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(w, want_w, rtol=1e-5)


# --------------------------------------------------------------------------- #
# Losses, counts, bias update, health metrics
# --------------------------------------------------------------------------- #

def test_expert_counts_ignore_no_expert_ids():
  idx = np.array([[0, 3], [3, 4], [4, 4], [1, 3]])  # E = 4: id 4 is "no expert"
  got = np.asarray(lb.expert_counts(jnp.asarray(idx), 4))
  np.testing.assert_array_equal(got, ref.counts_ref(idx, 4))
  np.testing.assert_array_equal(got, [1, 1, 0, 3])


@pytest.mark.parametrize("score_fn,top_k", [("softmax", 2), ("softmax", 1), ("sigmoid", 3)])
def test_load_balance_loss_matches_formula(score_fn, top_k):
  logits = _logits(num_tokens=17, seed=7 + top_k)
  idx, _, _, probs = _route(logits, top_k=top_k, score_fn=score_fn, renormalize=True,
                            routed_scaling_factor=1.0)
  counts = lb.expert_counts(jnp.asarray(idx), logits.shape[1])
  got = float(lb.load_balance_loss(jnp.asarray(probs), counts, top_k))
  want = ref.load_balance_ref(probs, idx, top_k)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(want - 1.0) > 1e-3  # random routing is not balanced


def test_load_balance_loss_gradient_flows_through_probs_only():
  logits = _logits(num_tokens=9, seed=8)
  idx, _, _, probs = _route(logits, top_k=2, score_fn="softmax", renormalize=True,
                            routed_scaling_factor=1.0)
  counts = lb.expert_counts(jnp.asarray(idx), 6)
  dp, dc = jax.grad(lambda p, c: lb.load_balance_loss(p, c, 2), argnums=(0, 1))(
      jnp.asarray(probs), counts)
  c = ref.counts_ref(idx, 6)
  num_tokens = probs.shape[0]
  # dL/dp_te = E / (k T) * c_e / T for every token.
  want = np.broadcast_to(6 / (2 * num_tokens) * c / num_tokens, probs.shape)
  np.testing.assert_allclose(np.asarray(dp), want, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(dc), 0.0)


@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (4, 2), (6, 3), (8, 2)])
def test_load_balance_loss_is_one_for_uniform_routing(num_experts, top_k):
  """Token t prefers experts t, t+1, ..., t+k-1 (mod E) equally: every expert gets
  T*k/E pairs and, by symmetry, mean probability 1/E."""
  num_tokens = 2 * num_experts
  logits = np.zeros((num_tokens, num_experts), np.float32)
  for t in range(num_tokens):
    for j in range(top_k):
      logits[t, (t + j) % num_experts] = 3.0
  idx, _, _, probs = _route(logits, top_k=top_k, score_fn="softmax", renormalize=True,
                            routed_scaling_factor=1.0)
  counts = lb.expert_counts(jnp.asarray(idx), num_experts)
  np.testing.assert_array_equal(np.asarray(counts), num_tokens * top_k / num_experts)
  np.testing.assert_allclose(probs.mean(0), 1.0 / num_experts, rtol=1e-6)
  got = float(lb.load_balance_loss(jnp.asarray(probs), counts, top_k))
  np.testing.assert_allclose(got, 1.0, rtol=1e-6)
  np.testing.assert_allclose(ref.load_balance_ref(probs, idx, top_k), 1.0, rtol=1e-6)


def test_load_balance_loss_of_collapsed_routing_is_near_num_experts():
  num_experts, num_tokens = 4, 10
  logits = np.zeros((num_tokens, num_experts), np.float32)
  logits[:, 0] = 20.0  # everything to expert 0 with probability ~1
  idx, _, _, probs = _route(logits, top_k=1, score_fn="softmax", renormalize=False,
                            routed_scaling_factor=1.0)
  counts = lb.expert_counts(jnp.asarray(idx), num_experts)
  got = float(lb.load_balance_loss(jnp.asarray(probs), counts, 1))
  np.testing.assert_allclose(got, ref.load_balance_ref(probs, idx, 1), rtol=1e-6)
  np.testing.assert_allclose(got, num_experts, rtol=1e-6)


def test_z_loss_matches_formula():
  logits = _logits(num_tokens=13, seed=9, scale=5.0)
  np.testing.assert_allclose(float(lb.z_loss(jnp.asarray(logits))), ref.z_loss_ref(logits),
                             rtol=1e-5)
  zeros = np.zeros((3, 8), np.float32)  # logsumexp = log 8
  np.testing.assert_allclose(float(lb.z_loss(jnp.asarray(zeros))), math.log(8) ** 2,
                             rtol=1e-6)


def test_updated_bias_direction_and_centring():
  counts = np.array([10.0, 2.0, 6.0, 6.0])  # mean 6: expert 0 over, expert 1 under
  got = np.asarray(lb.updated_bias(jnp.zeros(4), jnp.asarray(counts), 0.1))
  np.testing.assert_allclose(got, [-0.1, 0.1, 0.0, 0.0], atol=1e-7)

  rng = np.random.default_rng(10)
  bias = rng.normal(size=7).astype(np.float32)
  counts = np.array([0.0, 3.0, 9.0, 7.0, 12.0, 4.0, 8.0], np.float32)  # mean 43/7
  got = np.asarray(lb.updated_bias(jnp.asarray(bias), jnp.asarray(counts), 0.05))
  want = ref.updated_bias_ref(bias, counts, 0.05)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.mean(), 0.0, atol=1e-6)
  step = got - (bias - bias.mean())
  under, over = counts < counts.mean(), counts > counts.mean()
  assert under.any() and over.any()
  assert np.all(step[under] > 0) and np.all(step[over] < 0)


def test_updated_bias_leaves_an_expert_at_the_mean_unpushed():
  """sign(mean - c_e) must be exactly 0 for an expert at the mean. (jnp.mean on
  XLA:CPU is sum * (1/E): here 42 * (1/7) = 6.0000005, which would push it.)"""
  bias = np.zeros(7, np.float32)
  counts = np.array([0.0, 3.0, 9.0, 6.0, 12.0, 4.0, 8.0], np.float32)  # mean exactly 6
  got = np.asarray(lb.updated_bias(jnp.asarray(bias), jnp.asarray(counts), 0.05))
  want = ref.updated_bias_ref(bias, counts, 0.05)  # expert 3: sign(0) = 0
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("counts,dropped", [
    ([5.0, 5.0, 5.0, 5.0], 0),        # uniform
    ([4.0, 0.0, 2.0, 2.0], 3),
    ([0.0, 12.0, 0.0, 0.0], 7),       # collapsed
    ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 1),
])
def test_health_metrics_match_formula(counts, dropped):
  got = {k: float(v) for k, v in
         lb.health_metrics(jnp.asarray(counts), jnp.int32(dropped)).items()}
  want = ref.health_ref(counts, dropped)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
  if len(set(counts)) == 1:
    assert got["load_entropy"] == pytest.approx(1.0, abs=1e-6)
    assert got["load_max_over_mean"] == pytest.approx(1.0)
  if sum(c > 0 for c in counts) == 1:
    assert got["load_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert got["load_max_over_mean"] == pytest.approx(len(counts))


# --------------------------------------------------------------------------- #
# The MoE layer: bias state, global-batch losses
# --------------------------------------------------------------------------- #

D_MODEL = 16


def _layer(**moe):
  overrides = {"model.sublayer": "moe", "model.d_model": D_MODEL, "moe.num_experts": 4,
               "moe.top_k": 2, "moe.expert_ffn_dim": 8}
  overrides.update({f"moe.{k}": v for k, v in moe.items()})
  cfg = tiny_config(**overrides)
  layer = sublayers.build(cfg, 0, nnx.Rngs(0))
  rng = np.random.default_rng(21)
  layer.router.kernel[...] = jnp.asarray(
      rng.normal(size=layer.router.kernel.shape) / math.sqrt(D_MODEL), jnp.float32)
  return cfg, layer


def _x(batch=3, seq=8, seed=0, shifts=None):
  """Tokens; sequence b is shifted along its own direction, so sequences route
  differently from one another (per-sequence and global statistics differ)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, seq, D_MODEL))
  if shifts is not None:
    for b, s in enumerate(shifts):
      x[b] += s * rng.normal(size=D_MODEL)
  return jnp.asarray(x, jnp.float32)


def _naive_layer_routing(layer, cfg, x, bias=None):
  return ref.route_layer(layer, cfg, x, bias=bias)[1:]


def test_router_bias_is_state_not_a_param():
  _, layer = _layer(bias_update_rate=0.01)
  params = nnx.state(layer, nnx.Param)
  param_paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)]
  assert "router/kernel" in param_paths
  assert not any("bias" in p for p in param_paths), param_paths
  biases = nnx.to_flat_state(nnx.state(layer, RouterBias))
  assert ["/".join(map(str, p)) for p, _ in biases] == ["router/bias"]
  # Without the bias update the router has no bias at all.
  _, plain = _layer()
  assert plain.router.bias is None
  assert not nnx.to_flat_state(nnx.state(plain, RouterBias))


@pytest.mark.parametrize("use_jit", [False, True])
def test_bias_updates_in_train_mode_only(use_jit):
  rate = 0.01
  cfg, layer = _layer(bias_update_rate=rate, score_fn="sigmoid", renormalize=True,
                      routed_scaling_factor=2.5)
  x = _x(seed=1, shifts=[2.0, 0.0, -2.0])
  call = (nnx.jit(lambda m, x, train: m(x, train=train), static_argnums=2) if use_jit
          else (lambda m, x, train: m(x, train=train)))
  num_experts = cfg.moe.num_experts

  call(layer, x, False)
  np.testing.assert_array_equal(np.asarray(layer.router.bias[...]), 0.0)

  call(layer, x, True)
  _, idx, _, _ = _naive_layer_routing(layer, cfg, x)
  counts = ref.counts_ref(idx, num_experts)
  assert counts.min() < counts.mean() < counts.max()  # something to correct
  want1 = ref.updated_bias_ref(np.zeros(num_experts), counts, rate)
  b1 = np.asarray(layer.router.bias[...])
  np.testing.assert_allclose(b1, want1, atol=1e-7)
  assert np.all(b1[counts < counts.mean()] > 0) and np.all(b1[counts > counts.mean()] < 0)

  call(layer, x, False)  # evaluation leaves it alone
  np.testing.assert_array_equal(np.asarray(layer.router.bias[...]), b1)

  call(layer, x, True)  # the second step selects with the first step's bias
  _, idx2, _, _ = _naive_layer_routing(layer, cfg, x, bias=b1)
  want2 = ref.updated_bias_ref(b1, ref.counts_ref(idx2, num_experts), rate)
  np.testing.assert_allclose(np.asarray(layer.router.bias[...]), want2, atol=1e-6)


def test_layer_losses_are_global_over_the_batch():
  lb_coef, z_coef = 0.01, 1e-3
  cfg, layer = _layer(load_balance_coef=lb_coef, z_loss_coef=z_coef)
  x = _x(seed=2, shifts=[3.0, -3.0, 0.0])
  _, aux = layer(x, train=True)
  logits, idx, _, probs = _naive_layer_routing(layer, cfg, x)
  k = cfg.moe.top_k

  want_lb = lb_coef * ref.load_balance_ref(probs, idx, k)
  np.testing.assert_allclose(float(aux["loss/load_balance"]), want_lb, rtol=1e-5)
  # The test tells global from per-sequence statistics apart.
  seq = x.shape[1]
  per_seq = lb_coef * np.mean([
      ref.load_balance_ref(probs[b * seq:(b + 1) * seq], idx[b * seq:(b + 1) * seq], k)
      for b in range(x.shape[0])])
  assert abs(per_seq - want_lb) > 1e-3 * want_lb

  np.testing.assert_allclose(float(aux["loss/router_z"]), z_coef * ref.z_loss_ref(logits),
                             rtol=1e-5)
  np.testing.assert_allclose(float(aux["router_z"]), ref.z_loss_ref(logits), rtol=1e-5)

  counts = ref.counts_ref(idx, cfg.moe.num_experts)
  health = ref.health_ref(counts, 0)
  for key in ("load_entropy", "load_max_over_mean", "dropped_fraction"):
    np.testing.assert_allclose(float(aux[key]), health[key], rtol=1e-5, atol=1e-7,
                               err_msg=key)
  np.testing.assert_allclose(np.asarray(aux["expert_load/layer_00"]),
                             counts / counts.sum(), rtol=1e-6)


def test_layer_without_loss_coefficients_reports_no_losses():
  _, layer = _layer(load_balance_coef=0.0, z_loss_coef=0.0)
  _, aux = layer(_x(), train=True)
  assert not [k for k in aux if k.startswith("loss/")]
  assert "router_z" in aux


def test_load_balance_loss_gradient_reaches_the_router():
  """The layer's load-balance loss trains the router kernel (through probs)."""
  lb_coef = 0.5
  cfg, layer = _layer(load_balance_coef=lb_coef, z_loss_coef=0.0)
  x = _x(seed=3, shifts=[2.0, 0.0, -1.0])
  tokens = np.asarray(x, np.float64).reshape(-1, D_MODEL)

  def aux_loss(model):
    return model(x, train=True)[1]["loss/load_balance"]

  grads = nnx.grad(aux_loss)(layer)
  got = np.asarray(grads.router.kernel[...])
  # d/dW of coef * E/(kT) sum_e c_e mean_t softmax(x_t W)_e with c fixed.
  _, idx, _, probs = _naive_layer_routing(layer, cfg, x)
  num_tokens, num_experts = probs.shape
  c = ref.counts_ref(idx, num_experts)
  g_probs = lb_coef * num_experts / (cfg.moe.top_k * num_tokens) * c / num_tokens
  # softmax backward per token: dl = p * (g - <g, p>)
  g_logits = probs * (g_probs[None, :] - (probs * g_probs[None, :]).sum(-1, keepdims=True))
  want = tokens.T @ g_logits
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
