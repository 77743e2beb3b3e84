"""MoHGE (docs/papers/mohge.md) against the independent references of tests/mohge_reference.py.

  * route_groups: two-level routing, both gates, against a per-token float64 loop
  * the MoHGE layer: forward against a per-token float64 loop (both gates, both
    dropless backends; the full gate x backend product is marked slow); gradients
    of every parameter and of x against jax.grad of a per-token jnp function
    (jax.vmap over tokens, every expert evaluated and weighted by its combine
    weight: no library routing or dispatch)
  * the two auxiliary losses, the width weights, the half-training schedule of
    the group loss and where its gradient goes
  * the all-size group-decoupling placement and per-shard loads
  * active-parameter metrics and the "mohge" budget
  * config validation
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import budget
from moejax import config as config_lib
from moejax.papers.mohge import placement
from moejax.errors import ConfigError
from moejax.papers.mohge import balance as mohge_balance
from moejax.model import sublayers
from moejax.papers.mohge.group_router import route_groups
from tests import mohge_reference as ref
from tests.helpers import tiny_config

D = 16
PAPER_WIDTHS = (384, 512, 640, 768, 896, 1024, 1152, 1280)

# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _cfg(steps=10, **mohge):
  settings = dict(group_widths=(8, 12, 16, 20), experts_per_group=3, top_groups=2, top_k=3,
                  shared_ffn_dim=12, gate="megatron", backend="ragged_dot", group_aux_coef=0.3,
                  intra_aux_coef=0.2, group_aux_start_fraction=0.5,
                  group_aux_width_interval=0)
  settings.update(mohge)
  overrides = {"model.sublayer": "mohge", "model.d_model": D, "model.init_std": 0.25,
               "train.steps": steps}
  overrides.update({f"mohge.{k}": v for k, v in settings.items()})
  return tiny_config(**overrides)


def _build(layer_index=0, seed=0, steps=10, **mohge):
  """A MoHGE layer whose routers are large enough for decisive, non-uniform routing."""
  cfg = _cfg(steps=steps, **mohge)
  layer = sublayers.build(cfg, layer_index, nnx.Rngs(params=0))
  rng = np.random.default_rng(100 + seed)
  for name in ("group_router", "expert_router"):
    var = getattr(layer, name)
    var[...] = jnp.asarray(2.0 / math.sqrt(D) * rng.normal(size=var[...].shape), jnp.float32)
  return cfg, layer


def _x(batch=2, seq=8, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(batch, seq, D)), jnp.float32)


def _np_params(layer):
  """(group_router, expert_router, [(w_gate, w_up, w_down) per group], shared | None)."""
  groups = [tuple(np.asarray(getattr(g, w)[...], np.float64)
                  for w in ("w_gate", "w_up", "w_down")) for g in layer.groups]
  shared = None
  if layer.shared is not None:
    shared = tuple(np.asarray(getattr(layer.shared, w)[...], np.float64)
                   for w in ("w_gate", "w_up", "w_down"))
  return (np.asarray(layer.group_router[...], np.float64),
          np.asarray(layer.expert_router[...], np.float64), groups, shared)


def _reference(cfg, layer, x):
  """Everything the layer should compute, from the references (float64)."""
  h = cfg.mohge
  grp, exp, groups, shared = _np_params(layer)
  tokens = np.asarray(x, np.float64).reshape(-1, D)
  zg, ze = tokens @ grp, tokens @ exp
  mask, idx, w, margin = ref.route_ref(zg, ze, top_groups=h.top_groups, top_k=h.top_k,
                                       gate=h.gate)
  assert margin > 1e-4, "test data too close to a routing tie"
  num_groups = len(h.group_widths)
  num_experts = num_groups * h.experts_per_group
  y = ref.layer_ref(tokens, idx, w, groups, shared).reshape(x.shape)
  interval = h.group_aux_width_interval or (max(h.group_widths) - min(h.group_widths)
                                            + h.group_widths[1] - h.group_widths[0])
  ww = ref.width_weights_ref(list(h.group_widths), interval)
  return dict(tokens=tokens, zg=zg, ze=ze, mask=mask, idx=idx, w=w, y=y,
              group_loss=ref.group_loss_ref(zg, mask, ww, h.top_groups),
              intra_loss=ref.intra_loss_ref(idx, w, num_experts=num_experts,
                                            num_groups=num_groups, top_groups=h.top_groups),
              counts=ref.counts_ref(idx, num_experts), width_weights=ww)


def _relclose(got, want, rtol, err_msg=""):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(np.abs(want).max(), 1e-30),
                             err_msg=err_msg)


# --------------------------------------------------------------------------- #
# 1. route_groups
# --------------------------------------------------------------------------- #

ROUTING_SHAPES = [
    # (G, n, K_g, k)
    (4, 3, 2, 3),
    (3, 4, 1, 2),   # k inside a single group
    (4, 2, 3, 6),   # k = K_g n: every expert of the chosen groups
    (8, 2, 4, 6),   # the paper's K_g = 4, k = 6 (with 2 experts per group)
]


@pytest.mark.parametrize("gate", ["megatron", "renormalized"])
@pytest.mark.parametrize("shape", ROUTING_SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_route_groups_matches_reference(gate, shape, seed):
  num_groups, per_group, top_groups, top_k = shape
  rng = np.random.default_rng(seed)
  num_tokens = 20
  zg = (1.5 * rng.normal(size=(num_tokens, num_groups))).astype(np.float32)
  ze = (1.5 * rng.normal(size=(num_tokens, num_groups * per_group))).astype(np.float32)
  out = route_groups(jnp.asarray(zg), jnp.asarray(ze), top_groups=top_groups, top_k=top_k,
                     gate=gate)
  mask, idx, w = (np.asarray(a) for a in out)
  want_mask, want_idx, want_w, margin = ref.route_ref(zg, ze, top_groups=top_groups,
                                                      top_k=top_k, gate=gate)
  assert margin > 1e-5
  assert idx.shape == (num_tokens, top_k) and idx.dtype == np.int32
  assert w.shape == (num_tokens, top_k) and w.dtype == np.float32
  np.testing.assert_array_equal(mask, want_mask)
  for t in range(num_tokens):
    assert set(idx[t].tolist()) == set(want_idx[t].tolist()), t
    got = dict(zip(idx[t].tolist(), w[t].tolist()))
    want = dict(zip(want_idx[t].tolist(), want_w[t].tolist()))
    for e in want:
      np.testing.assert_allclose(got[e], want[e], rtol=2e-6, atol=1e-7, err_msg=f"t={t} e={e}")
    chosen_groups = set(np.flatnonzero(want_mask[t]).tolist())
    assert {e // per_group for e in idx[t].tolist()} <= chosen_groups
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  # The two gates really differ (the Megatron one is close to uniform).
  other = "renormalized" if gate == "megatron" else "megatron"
  _, _, w_other, _ = ref.route_ref(zg, ze, top_groups=top_groups, top_k=top_k, gate=other)
  assert np.abs(w_other - want_w).max() > 1e-2


def test_route_groups_never_picks_an_unchosen_group_even_when_it_is_preferred():
  # Group 1 has tiny group logits but one huge expert logit: the expert level must
  # not reach it (r is exactly 0 outside the chosen groups).
  num_tokens, num_groups, per_group = 6, 3, 2
  zg = np.tile(np.array([2.0, -4.0, 1.0], np.float32), (num_tokens, 1))
  ze = np.zeros((num_tokens, num_groups * per_group), np.float32)
  ze[:, 2] = 30.0  # expert 0 of group 1
  for gate in ("megatron", "renormalized"):
    mask, idx, w = (np.asarray(a) for a in route_groups(
        jnp.asarray(zg), jnp.asarray(ze), top_groups=2, top_k=3, gate=gate))
    np.testing.assert_array_equal(mask, np.tile([1.0, 0.0, 1.0], (num_tokens, 1)))
    assert not np.any(idx // per_group == 1)
    _, want_idx, want_w, _ = ref.route_ref(zg, ze, top_groups=2, top_k=3, gate=gate)
    assert not np.any(want_idx // per_group == 1)
    np.testing.assert_allclose(np.sort(w, -1), np.sort(want_w, -1), rtol=1e-6)


def test_route_groups_rejects_unknown_gate():
  with pytest.raises(ValueError, match="gate"):
    route_groups(jnp.zeros((2, 2)), jnp.zeros((2, 4)), top_groups=1, top_k=1, gate="softmax")


# --------------------------------------------------------------------------- #
# 2. the layer: forward and gradients
# --------------------------------------------------------------------------- #

def _swiglu_jnp(x, wg, wu, wd):
  a = x @ wg
  return (a / (1.0 + jnp.exp(-a)) * (x @ wu)) @ wd


def _naive_token(p, xt, mask_t, onehot_t, h):
  """One token, jnp, straight from §2.a with the routing decisions fixed:
  mask_t [G] chosen groups, onehot_t [k, E] chosen experts. Every expert is
  evaluated on the token and weighted by its combine weight (0 if unchosen).
  Returns (y_t [d], combine weight per expert [E], softmax of group logits [G])."""
  num_groups, n = len(h.group_widths), h.experts_per_group
  zg = xt @ p[("group_router",)]
  ze = xt @ p[("expert_router",)]
  s = 1.0 / (1.0 + jnp.exp(-zg))
  pi = mask_t * s / jnp.sum(mask_t * s)
  ze = ze.reshape(num_groups, n)
  q = jnp.exp(ze - jnp.max(ze, axis=1, keepdims=True))
  q = q / jnp.sum(q, axis=1, keepdims=True)
  r = (q * pi[:, None]).reshape(-1)
  r = r / jnp.sum(r)
  sel = onehot_t @ r
  if h.gate == "megatron":
    w = jnp.exp(sel - jnp.max(sel))
    w = w / jnp.sum(w)
  else:
    w = sel / jnp.sum(sel)
  c = w @ onehot_t
  y = 0.0
  for e in range(num_groups * n):
    g, i = e // n, e % n
    y = y + c[e] * _swiglu_jnp(xt, p[("groups", g, "w_gate")][i],
                               p[("groups", g, "w_up")][i], p[("groups", g, "w_down")][i])
  if h.shared_ffn_dim:
    y = y + _swiglu_jnp(xt, p[("shared", "w_gate")], p[("shared", "w_up")],
                        p[("shared", "w_down")])
  soft = jnp.exp(zg - jnp.max(zg))
  return y, c, soft / jnp.sum(soft)


def _naive_loss(p, x, *, mask, idx, width_weights, proj, h):
  """sum_t <y_t, proj_t> + alpha_e L_intra + alpha_g L_group (group loss on), per
  token through jax.vmap; n_e and n_g are constants from the reference routing."""
  num_groups = len(h.group_widths)
  num_experts = num_groups * h.experts_per_group
  tokens = x.reshape(-1, x.shape[-1])
  num_tokens = tokens.shape[0]
  onehot = jnp.asarray(np.eye(num_experts)[np.asarray(idx)], jnp.float32)  # [T, k, E]
  y, c, soft = jax.vmap(lambda xt, m, oh: _naive_token(p, xt, m, oh, h))(
      tokens, jnp.asarray(mask, jnp.float32), onehot)
  n_e = jnp.asarray(onehot.sum((0, 1)))
  n_g = jnp.asarray(mask.sum(0), jnp.float32)
  intra = (num_experts * h.top_groups / num_groups / (num_tokens ** 2 * h.top_k)
           * jnp.sum(c.sum(0) * n_e))
  grp = (num_groups / (num_tokens ** 2 * h.top_groups)
         * jnp.sum(jnp.asarray(width_weights, jnp.float32) * soft.sum(0) * n_g))
  return jnp.sum(y * proj) + h.intra_aux_coef * intra + h.group_aux_coef * grp


@pytest.mark.parametrize("gate,backend", [
    ("megatron", "sorted"), ("renormalized", "ragged_dot"),
    pytest.param("renormalized", "sorted", marks=pytest.mark.slow),
    pytest.param("megatron", "ragged_dot", marks=pytest.mark.slow),
])
def test_layer_matches_reference_forward_losses_and_gradients(gate, backend):
  cfg, layer = _build(gate=gate, backend=backend, seed=1)
  h = cfg.mohge
  x = _x(seed=1)
  step = 6  # the group loss is on (steps=10, start 0.5)
  proj = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(-1, D)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss_fn(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x, step=jnp.int32(step), train=True)
    loss = (jnp.sum(y.reshape(-1, D) * proj) + aux["loss/intra_group"]
            + aux["loss/group_balance"])
    return loss, (y, aux)

  (loss, (y, aux)), (gp, gx) = jax.jit(
      jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(params, x)

  # Forward and losses against the float64 per-token reference.
  want = _reference(cfg, layer, x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  _relclose(y, want["y"], 2e-5)
  _, _, groups, shared = _np_params(layer)
  shared_only = ref.layer_ref(want["tokens"], want["idx"], 0 * want["w"], groups, shared)
  # The routed part is not negligible next to the shared expert.
  assert np.abs(want["y"].reshape(-1, D) - shared_only).max() > 0.1 * np.abs(want["y"]).max()
  np.testing.assert_allclose(float(aux["loss/intra_group"]),
                             h.intra_aux_coef * want["intra_loss"], rtol=1e-5)
  np.testing.assert_allclose(float(aux["group_balance"]), want["group_loss"], rtol=1e-5)
  np.testing.assert_allclose(float(aux["loss/group_balance"]),
                             h.group_aux_coef * want["group_loss"], rtol=1e-5)

  # Gradients against jax.grad of the naive per-token jnp implementation.
  naive = functools.partial(_naive_loss, mask=want["mask"], idx=want["idx"],
                            width_weights=want["width_weights"], proj=proj, h=h)
  flat = {path: v[...] for path, v in nnx.to_flat_state(params)}
  value, (wp, wx) = jax.jit(jax.value_and_grad(naive, argnums=(0, 1)))(flat, x)
  np.testing.assert_allclose(float(value), float(loss), rtol=1e-5)
  got = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(gp)}
  assert set(got) == set(wp)
  for path in sorted(got, key=str):
    _relclose(got[path], wp[path], 2e-4, err_msg=str(path))
    assert np.abs(np.asarray(wp[path])).max() > 0, path  # every parameter gets a gradient
  _relclose(gx, wx, 2e-4, err_msg="x")


def test_layer_without_shared_expert_matches_reference():
  cfg, layer = _build(shared_ffn_dim=0, seed=3)
  assert layer.shared is None
  x = _x(seed=3)
  y, _ = layer(x, step=jnp.int32(0), train=False)
  _relclose(y, _reference(cfg, layer, x)["y"], 2e-5)


# --------------------------------------------------------------------------- #
# 3. auxiliary losses
# --------------------------------------------------------------------------- #

def test_width_weights_of_the_paper():
  want = [1.0 + 0.125 * g for g in range(8)]
  np.testing.assert_allclose(np.asarray(mohge_balance.width_weights(PAPER_WIDTHS, 1024)),
                             want, rtol=1e-7)
  # D = 0: W_max - W_min + (W_1 - W_0) = 896 + 128 = 1024 for these widths.
  np.testing.assert_allclose(np.asarray(mohge_balance.width_weights(PAPER_WIDTHS, 0)),
                             want, rtol=1e-7)
  np.testing.assert_allclose(np.asarray(mohge_balance.width_weights((8, 12, 16, 20), 100)),
                             ref.width_weights_ref([8, 12, 16, 20], 100), rtol=1e-7)


@pytest.mark.slow
def test_layer_group_loss_with_the_paper_widths():
  """The default D (0) gives the paper's D = 1024 for its widths in the layer."""
  cfg, layer = _build(group_widths=PAPER_WIDTHS, experts_per_group=1, top_groups=4, top_k=3,
                      shared_ffn_dim=0, group_aux_width_interval=0, seed=4)
  x = _x(seed=4)
  _, aux = layer(x, step=jnp.int32(9), train=True)
  want = _reference(cfg, layer, x)
  np.testing.assert_allclose(want["width_weights"], [1.0 + 0.125 * g for g in range(8)])
  grp, _, _, _ = _np_params(layer)
  zg = want["tokens"] @ grp
  lit = ref.group_loss_ref(zg, want["mask"], [1.0 + 0.125 * g for g in range(8)], 4)
  np.testing.assert_allclose(float(aux["group_balance"]), lit, rtol=1e-5)
  np.testing.assert_allclose(float(aux["loss/group_balance"]),
                             cfg.mohge.group_aux_coef * lit, rtol=1e-5)
  np.testing.assert_allclose(float(aux["loss/intra_group"]),
                             cfg.mohge.intra_aux_coef * want["intra_loss"], rtol=1e-5)
  # Not the unweighted loss: the width weights matter.
  assert abs(ref.group_loss_ref(zg, want["mask"], [1.0] * 8, 4) - lit) > 1e-3 * lit


@pytest.mark.parametrize("steps,fraction", [(10, 0.5), (11, 0.5), (7, 0.5), (6, 0.0),
                                            (6, 1.0)])
def test_group_loss_schedule(steps, fraction):
  cfg, layer = _build(steps=steps, group_aux_start_fraction=fraction,
                      group_aux_width_interval=100, seed=5)
  x = _x(seed=5)
  want = _reference(cfg, layer, x)
  for step in range(steps):
    _, aux = layer(x, step=jnp.int32(step), train=True)
    np.testing.assert_allclose(float(aux["group_balance"]), want["group_loss"], rtol=1e-5)
    # Megatron: coeff if global_step > train_iters // 2 else 0, global_step = step + 1
    # (written for start fraction 0.5; 0 = on from the start, 1 = never).
    threshold = {0.5: steps // 2, 0.0: 0, 1.0: steps}[fraction]
    on = step + 1 > threshold
    expect = cfg.mohge.group_aux_coef * want["group_loss"] if on else 0.0
    np.testing.assert_allclose(float(aux["loss/group_balance"]), expect, rtol=1e-5,
                               err_msg=f"step {step}")
    if fraction == 0.5:
      assert on == (step >= (steps // 2))
  _, aux_eval = layer(x, step=jnp.int32(steps - 1), train=False)
  assert "loss/group_balance" not in aux_eval
  np.testing.assert_allclose(float(aux_eval["group_balance"]), want["group_loss"], rtol=1e-5)


def test_group_loss_schedule_accepts_a_python_int_step():
  _, layer = _build(seed=5)
  x = _x(seed=5)
  _, want = layer(x, step=jnp.int32(7), train=True)
  _, aux = layer(x, step=7, train=True)
  np.testing.assert_allclose(float(aux["loss/group_balance"]),
                             float(want["loss/group_balance"]), rtol=1e-6)


def test_group_loss_start_step_is_exact_for_decimal_fractions():
  # Megatron's rule generalised: on iff step + 1 > floor(fraction * steps), exactly:
  # 0.29 of 100 steps = 29 steps done before the loss turns on.
  _, layer = _build(steps=100, group_aux_start_fraction=0.29, seed=5)
  x = _x(seed=5)
  _, aux28 = layer(x, step=jnp.int32(28), train=True)
  _, aux29 = layer(x, step=jnp.int32(29), train=True)
  assert float(aux29["loss/group_balance"]) > 0
  assert float(aux28["loss/group_balance"]) == 0.0


def test_group_loss_gradient_goes_to_the_group_router_only():
  cfg, layer = _build(seed=6)
  h = cfg.mohge
  x = _x(seed=6)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def group_loss(params):
    return nnx.merge(graphdef, params, rest)(x, step=jnp.int32(9), train=True)[1][
        "loss/group_balance"]

  grads = {path: np.asarray(v[...]) for path, v in
           nnx.to_flat_state(jax.jit(jax.grad(group_loss))(params))}
  want = _reference(cfg, layer, x)
  # d/dW of alpha G/(T^2 K_g) sum_g w_g n_g sum_t softmax(x_t W)_g with n fixed.
  num_tokens, num_groups = want["zg"].shape
  zg = want["zg"]
  probs = np.exp(zg - zg.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  coef = h.group_aux_coef * num_groups / (num_tokens ** 2 * h.top_groups)
  g = coef * np.asarray(want["width_weights"]) * want["mask"].sum(0)
  g_logits = probs * (g[None, :] - (probs * g[None, :]).sum(-1, keepdims=True))
  _relclose(grads[("group_router",)], want["tokens"].T @ g_logits, 1e-4)
  assert np.abs(grads[("group_router",)]).max() > 0
  for path, value in grads.items():
    if path != ("group_router",):
      np.testing.assert_array_equal(value, 0.0, err_msg=str(path))


def test_losses_absent_when_coefficients_are_zero():
  _, layer = _build(group_aux_coef=0.0, intra_aux_coef=0.0)
  _, aux = layer(_x(), step=jnp.int32(9), train=True)
  assert not [k for k in aux if k.startswith("loss/")]
  assert "group_balance" not in aux


# --------------------------------------------------------------------------- #
# 4. placement
# --------------------------------------------------------------------------- #

def test_decoupled_group_order_of_the_paper():
  assert placement.decoupled_group_order(8) == [0, 7, 1, 6, 2, 5, 3, 4]
  assert [ref.decoupled_group_of(e, 8) for e in range(8)] == [0, 7, 1, 6, 2, 5, 3, 4]
  assert placement.decoupled_group_order(1) == [0]
  assert placement.decoupled_group_order(5) == [0, 4, 1, 3, 2]


@pytest.mark.parametrize("num_groups", [2, 3, 4, 8])
@pytest.mark.parametrize("per_group", [1, 2, 4])
def test_expert_order_matches_the_closed_form(num_groups, per_group):
  order = placement.expert_order(num_groups, per_group, "decoupled")
  num_experts = num_groups * per_group
  assert sorted(order) == [(g, j) for g in range(num_groups) for j in range(per_group)]
  perm = placement.decoupled_group_order(num_groups)
  for e in range(num_experts):
    group, index = ref.decoupled_slot(e, num_groups)
    assert order[e][1] == index
    if num_groups % 2 == 0 or (e // num_groups) % 2 == 0:
      assert order[e] == (group, index), e
    # The paper's router: e = j G + p has group perm[p] (any G).
    assert order[e] == (perm[e % num_groups], e // num_groups)
  # Every run of G consecutive positions holds one expert of each group.
  for j in range(per_group):
    assert sorted(g for g, _ in order[j * num_groups:(j + 1) * num_groups]) == \
        list(range(num_groups))
  assert placement.expert_order(num_groups, per_group, "sorted") == \
      [(g, j) for g in range(num_groups) for j in range(per_group)]
  with pytest.raises(ValueError, match="placement"):
    placement.expert_order(num_groups, per_group, "random")


def test_closed_form_for_odd_group_counts_is_not_the_router_permutation():
  """Documents a property of the authors' formula: with (-1)^(e mod 2) the sign
  flips with e, not with e mod G, so for odd G the runs with odd j swap groups
  (the paper only uses G = 8, where both agree)."""
  assert [ref.decoupled_group_of(e, 3) for e in range(6)] == [0, 2, 1, 0, 1, 2]
  assert [g for g, _ in placement.expert_order(3, 2, "decoupled")] == [0, 2, 1, 0, 2, 1]


def test_shard_loads_hand_computed():
  tokens = np.array([[1, 2], [3, 4], [5, 6], [7, 8]])
  widths = [10, 20, 30, 40]
  # decoupled order for G=4: (0,0) (3,0) (1,0) (2,0) | (0,1) (3,1) (1,1) (2,1)
  np.testing.assert_array_equal(placement.shard_loads(tokens, widths, 2, "decoupled"),
                                [1 * 10 + 7 * 40 + 3 * 20 + 5 * 30,
                                 2 * 10 + 8 * 40 + 4 * 20 + 6 * 30])  # [500, 600]
  np.testing.assert_array_equal(placement.shard_loads(tokens, widths, 4, "decoupled"),
                                [290, 210, 340, 260])
  np.testing.assert_array_equal(placement.shard_loads(tokens, widths, 2, "sorted"),
                                [170, 930])
  np.testing.assert_array_equal(placement.shard_loads(tokens, widths, 4, "sorted"),
                                [30, 140, 330, 600])
  with pytest.raises(ValueError):
    placement.shard_loads(tokens, widths, 3, "decoupled")


@pytest.mark.parametrize("ep", [2, 4, 8])
def test_decoupled_placement_balances_shards(ep):
  num_groups, per_group = 8, 8
  widths = [384 + 128 * g for g in range(num_groups)]
  # Balanced inside every group; group totals arbitrary.
  per_group_tokens = np.array([50, 3, 17, 40, 9, 22, 31, 5])
  for tokens in (np.full((num_groups, per_group), 12),
                 np.repeat(per_group_tokens[:, None], per_group, axis=1)):
    load = placement.shard_loads(tokens, widths, ep, "decoupled")
    total = float(np.sum(tokens * np.asarray(widths)[:, None]))
    np.testing.assert_allclose(load, total / ep, rtol=1e-12)
    sorted_load = placement.shard_loads(tokens, widths, ep, "sorted")
    np.testing.assert_allclose(sorted_load.sum(), total)
    assert sorted_load.max() > 1.05 * sorted_load.min()
  # Independent: shard s holds positions [s E/EP, (s+1) E/EP) of the closed form.
  tokens = np.full((num_groups, per_group), 12)
  load = placement.shard_loads(tokens, widths, ep, "decoupled")
  size = num_groups * per_group // ep
  for s in range(ep):
    want = sum(12 * widths[ref.decoupled_group_of(e, num_groups)]
               for e in range(s * size, (s + 1) * size))
    assert load[s] == want


def test_from_decoupled():
  for num_groups, per_group in ((4, 3), (8, 2), (2, 5)):
    vec = np.arange(num_groups * per_group) * 10 + 7
    logged = ref.decoupled_from_group_major(vec, num_groups)
    np.testing.assert_array_equal(placement.from_decoupled(logged, num_groups),
                                  vec.reshape(num_groups, per_group))


def test_expert_load_is_in_the_decoupled_order():
  cfg, layer = _build(layer_index=3, seed=7)
  x = _x(seed=7)
  _, aux = layer(x, step=jnp.int32(0), train=True)
  want = _reference(cfg, layer, x)
  counts = want["counts"]
  assert len(set(counts.tolist())) > 2  # unequal loads: the order is visible
  share = counts / counts.sum()
  np.testing.assert_allclose(np.asarray(aux["expert_load/layer_03"]),
                             ref.decoupled_from_group_major(share, 4), rtol=1e-6)
  assert not np.allclose(np.asarray(aux["expert_load/layer_03"]), share)
  group_counts = counts.reshape(4, 3).sum(1)
  np.testing.assert_allclose(np.asarray(aux["group_share/layer_03"]),
                             group_counts / group_counts.sum(), rtol=1e-6)
  mean = counts.mean()
  np.testing.assert_allclose(float(aux["load_max_over_mean"]), counts.max() / mean, rtol=1e-6)
  pk = share[share > 0]
  np.testing.assert_allclose(float(aux["load_entropy"]),
                             -np.sum(pk * np.log(pk)) / math.log(len(counts)), rtol=1e-5)


# --------------------------------------------------------------------------- #
# 5. active parameters and the budget
# --------------------------------------------------------------------------- #

def test_active_params_and_routed_width():
  cfg, layer = _build(seed=8)
  h = cfg.mohge
  x = _x(seed=8)
  _, aux = layer(x, step=jnp.int32(0), train=True)
  want = _reference(cfg, layer, x)
  num_tokens = want["idx"].shape[0]
  num_groups = len(h.group_widths)
  routed = sum(h.group_widths[int(e) // h.experts_per_group]
               for e in want["idx"].reshape(-1)) / num_tokens
  router = D * (num_groups + num_groups * h.experts_per_group)
  np.testing.assert_allclose(float(aux["routed_width"]), routed, rtol=1e-6)
  np.testing.assert_allclose(float(aux["active_params"]),
                             router + 3 * D * h.shared_ffn_dim + 3 * D * routed, rtol=1e-6)
  # Routing is uneven over the widths: not the uniform expectation.
  assert abs(routed - h.top_k * np.mean(h.group_widths)) > 0.1


@pytest.mark.parametrize("mohge", [
    {}, {"shared_ffn_dim": 0},
    {"group_widths": PAPER_WIDTHS, "experts_per_group": 2, "top_groups": 4, "top_k": 6},
])
def test_budget_matches_built_layer(mohge):
  cfg = _cfg(**mohge)
  h = cfg.mohge
  layer = nnx.eval_shape(lambda: sublayers.build(cfg, 0, nnx.Rngs(params=0)))
  built = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  b = sublayers.get("mohge").budget(cfg, 0)
  assert b["params"] == built
  num_groups = len(h.group_widths)
  router = D * num_groups * (1 + h.experts_per_group)
  mean_width = sum(h.group_widths) / num_groups
  shared = 3 * D * h.shared_ffn_dim
  assert b["active_params"] == int(router + h.top_k * 3 * D * mean_width + shared)
  assert b["flops_per_token"] == int(2 * router + 2 * h.top_k * 3 * D * mean_width
                                     + 2 * shared + 4 * h.top_k * D)


@pytest.mark.parametrize("preset", ["tiny", "matched_tiny", "small"])
def test_model_budget_matches_built_model(preset):
  from configs.mohge import get_config
  from moejax.model.transformer import Transformer
  cfg = get_config(preset)
  model = nnx.eval_shape(lambda: Transformer(cfg, 2048, nnx.Rngs(params=0)))
  built = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert budget.model_budget(cfg, 2048)["params"] == built


def test_matched_tiny_has_the_baseline_parameters():
  """matched_tiny: widths 40..88 (mean 64) against 16 experts of width 64, same
  shared width: equal totals and uniform-routing active counts, up to the group
  router's G d weights; tiny (mean 52) has fewer."""
  from configs.mohge import get_config
  d = get_config("matched_tiny").model.d_model
  b = budget.model_budget(get_config("baseline_tiny"), 2048)
  m = budget.model_budget(get_config("matched_tiny"), 2048)
  t = budget.model_budget(get_config("tiny"), 2048)
  num_layers = get_config("tiny").model.num_layers
  assert m["params"] == b["params"] + num_layers * 4 * d
  assert m["active_params"] == b["active_params"] + num_layers * 4 * d
  assert m["params"] - t["params"] == num_layers * 3 * d * 4 * (4 * 12)
  assert t["active_params"] < m["active_params"]


# --------------------------------------------------------------------------- #
# 6. config validation
# --------------------------------------------------------------------------- #

def test_valid_config_passes():
  config_lib.validate(_cfg(), num_devices=8, check_data=False)
  cfg = _cfg(experts_per_group=4)
  cfg.mesh.data, cfg.mesh.expert = 2, 4
  config_lib.validate(cfg, num_devices=8, check_data=False)


@pytest.mark.parametrize("mohge,mesh,match", [
    ({"top_groups": 5}, {}, "top_groups"),
    ({"top_groups": 2, "top_k": 7}, {}, "top_k"),
    ({"gate": "softmax"}, {}, "gate"),
    ({"backend": "capacity"}, {}, "dropless"),
    ({"experts_per_group": 3}, {"expert": 2, "data": 4}, "experts_per_group"),
    ({"group_aux_coef": -1e-5}, {}, "group_aux_coef"),
    ({"intra_aux_coef": -5e-3}, {}, "intra_aux_coef"),
    ({"group_aux_width_interval": -1}, {}, "group_aux_width_interval"),
    ({"group_aux_start_fraction": 1.5}, {}, "group_aux_start_fraction"),
    ({"group_aux_start_fraction": -0.1}, {}, "group_aux_start_fraction"),
    ({"group_widths": (8, 0, 16)}, {}, "group_widths"),
    ({"group_widths": (20, 16, 12, 8)}, {}, "must increase strictly"),
    ({"group_widths": (8, 12, 16, 21)}, {"expert": 2, "tensor": 2, "data": 2},
     "divisible by the tensor mesh axis"),
    ({"top_k": 0}, {}, "top_k"),
])
def test_config_errors(mohge, mesh, match):
  cfg = _cfg(**mohge)
  for axis, size in mesh.items():
    cfg.mesh[axis] = size
  with pytest.raises(ConfigError, match=match) as info:
    config_lib.validate(cfg, num_devices=8, check_data=False)
  assert "--config.mohge." in str(info.value)
