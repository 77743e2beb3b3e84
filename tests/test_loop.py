"""The looped block (LoopMoE, moejax/model/loop.py) and IterAdaLN against naive
references (tests/loop_reference.py), on a tiny MoE Transformer.

  * IterAdaLN == its equations in numpy float64 (random nonzero W_mod, b_mod,
    b1, b2; gate on and off; several iteration indices, static and traced);
  * the looped Transformer (lax.scan) == the decoder unrolled in a Python loop,
    logits, auxiliary losses and gradients of every parameter, for the plans
    (prefix 1, block 1, R 3, suffix 1) and (prefix 0, block 2, R 2, suffix 0),
    with IterAdaLN (random W_mod) and without (Loop Base);
  * zero W_mod (fresh model) == Loop Base of the same seed, bit for bit;
  * loop.remat changes nothing; model state (router biases) is carried from
    one iteration to the next; the loop diagnostics and per-iteration routing
    statistics; parameter and FLOP budgets; sharded == unsharded on 8 fake CPU
    devices; train and eval calls under jit.
"""

import copy
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import budget, sharding
from moejax.moe import layer as moe_module
from moejax.papers.loopmoe.iter_adaln import IterAdaLN
from moejax.model.transformer import Transformer
from tests import loop_reference as ref
from tests.helpers import tiny_config

VOCAB, D, SEQ, BATCH = 64, 32, 8, 8
ADALN_DIM, PE_DIM = 4, 8
PLANS = {"p1b1r3s1": (1, 1, 3, 1), "p0b2r2s0": (0, 2, 2, 0)}
BIAS_RATE = 0.05  # aux-loss-free router bias: the state the loop carries
# Unoptimised CPU code: these tiny programs compile ~3x faster, run as fast.
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_parallel_codegen_split_count": 1}


def _cfg(plan, *, iter_adaln=True, gate=True, remat=False, **extra):
  """A tiny looped MoE Transformer; plan = (prefix, block, iterations, suffix).
  Dropless dispatch (ragged_dot; expert parallelism without a send cap)."""
  prefix, block, reps, suffix = plan
  overrides = {
      "model.sublayer": "moe", "model.d_model": D, "model.num_layers": prefix + block + suffix,
      "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 16,
      "model.init_std": 0.2, "data.seq_len": SEQ,
      "moe.num_experts": 8, "moe.top_k": 2, "moe.expert_ffn_dim": 16,
      "moe.backend": "ragged_dot", "moe.ep_capacity_factor": 0.0,
      "moe.load_balance_coef": 0.1, "moe.z_loss_coef": 0.01,
      "loop.prefix_layers": prefix, "loop.block_layers": block, "loop.iterations": reps,
      "loop.iter_adaln": iter_adaln, "loop.adaln_gate": gate, "loop.remat": remat,
      "loop.adaln_dim": ADALN_DIM, "loop.adaln_pe_dim": PE_DIM}
  overrides.update(extra)
  return tiny_config(**overrides)


def _randomize_adaln(model, seed=0) -> int:
  """Random nonzero W_mod, b_mod, b1, b2 in every IterAdaLN; -> how many."""
  rng = np.random.default_rng(seed)
  sites = 0
  for block in model.blocks:
    for mod in (block.attn_mod, block.ffn_mod):
      if mod is None:
        continue
      for name, std in (("w_mod", 0.3), ("b_mod", 0.1), ("b1", 0.3), ("b2", 0.3)):
        var = getattr(mod, name)
        var[...] = jnp.asarray(std * rng.standard_normal(var[...].shape), jnp.float32)
      sites += 1
  return sites


def _model(cfg, *, random_mod=True):
  model = Transformer(cfg, VOCAB, nnx.Rngs(params=cfg.seed))
  if random_mod and cfg.loop.iter_adaln:
    assert _randomize_adaln(model) == 2 * cfg.loop.block_layers
  return model


def _tokens(batch=BATCH, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, SEQ), 0, VOCAB)


def _objective(logits, losses: dict):
  """A scalar of the logits with no cancellation (positive terms, weights in
  [0.5, 2.5]), plus the auxiliary losses."""
  w = 1.5 + jnp.cos(jnp.arange(logits.size, dtype=jnp.float32).reshape(logits.shape))
  return jnp.sum(w * logits * logits) + sum(losses.values())


_GRAD_FNS = {}  # compiled once per model structure: several tests share them


def _run(cfg, model, tokens, *, naive, train=True, mesh=None):
  """jit(value_and_grad) of _objective through the looped model (naive=False)
  or the unrolled reference (naive=True).
  -> host dict(loss, logits, aux, state (pure dict after the call), grads)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest, tokens):
    # Fresh variables: a train-mode call writes the router biases.
    rest = jax.tree.map(lambda v: v, rest)
    m = nnx.merge(graphdef, params, rest)
    if naive:
      probe = lambda: nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))
      aux = ref.unrolled_forward(m, tokens, cfg, train=train, state_probe=probe)
      logits, losses = aux["logits"], ref.total_aux_losses(aux)
    else:
      logits, aux = m(tokens, train=train)
      losses = {k: v for k, v in aux.items() if k.startswith("loss/")}
    return _objective(logits, losses), (logits, aux, nnx.state(m, nnx.Not(nnx.Param)))

  key = (cfg.to_json(), naive, train)
  if key not in _GRAD_FNS:
    _GRAD_FNS[key] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST)
  fn = _GRAD_FNS[key]
  if mesh is None:
    (loss, (logits, aux, new_rest)), grads = fn(params, rest, tokens)
  else:
    rules = cfg.sharding.rules
    with sharding.use_mesh(mesh, rules):
      params = jax.device_put(params, sharding.state_shardings(params, mesh, rules))
      rest = jax.device_put(rest, jax.tree.map(lambda _: sharding.replicated(mesh), rest))
      tokens = jax.device_put(tokens, sharding.batch_sharding(mesh))
      (loss, (logits, aux, new_rest)), grads = fn(params, rest, tokens)
  loss, logits, aux, new_rest, grads = jax.device_get((loss, logits, aux, new_rest, grads))
  return dict(loss=loss, logits=logits, aux=aux, state=nnx.to_pure_dict(new_rest),
              grads=grads)


@functools.lru_cache(maxsize=None)
def _cached(plan_name, iter_adaln, naive, remat=False):
  """Train-mode loss, logits, aux, new state and gradients (router bias on,
  random W_mod), shared by several tests."""
  cfg = _cfg(PLANS[plan_name], iter_adaln=iter_adaln, remat=remat,
             **{"moe.bias_update_rate": BIAS_RATE})
  return _run(cfg, _model(cfg), _tokens(), naive=naive)


def _forward_fn(model, *, train):
  """jax.jit of a model call through split/merge (as the train step does):
  -> fn(model, tokens, step) -> (logits, aux), writing the new state back."""
  graphdef, _, _ = nnx.split(model, nnx.Param, ...)

  @functools.partial(jax.jit, compiler_options=FAST)
  def call(params, rest, tokens, step):
    rest = jax.tree.map(lambda v: v, rest)
    m = nnx.merge(graphdef, params, rest)
    logits, aux = m(tokens, step=step, train=train)
    return logits, aux, nnx.state(m, nnx.Not(nnx.Param))

  def fn(model, tokens, step=None):
    _, params, rest = nnx.split(model, nnx.Param, ...)
    logits, aux, new_rest = call(params, rest, tokens, step)
    nnx.update(model, new_rest)
    return logits, aux

  return fn


def _non_params(model) -> dict:
  return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))


def _assert_trees_close(got, want, *, rtol, atol, nonzero=()):
  """Leaf by leaf; atol is relative to the leaf's largest |value|. Leaves whose
  path contains a string of `nonzero` must not be all zero."""
  want_flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(want)}
  got_flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(got)}
  assert set(got_flat) == set(want_flat)
  for key, value in got_flat.items():
    scale = float(np.abs(want_flat[key]).max()) if np.size(want_flat[key]) else 0.0
    np.testing.assert_allclose(value, want_flat[key], rtol=rtol, atol=atol * scale,
                               err_msg=key)
  for part in nonzero:
    hits = [k for k in want_flat if part in k]
    assert hits, part
    for k in hits:
      assert np.abs(want_flat[k]).max() > 0, k


# --------------------------------------------------------------------------- #
# 1. IterAdaLN == its equations
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("gate", [True, False])
def test_iter_adaln_equals_equations(gate):
  mod = IterAdaLN(D, ADALN_DIM, PE_DIM, gate=gate, init_std=0.5, rngs=nnx.Rngs(params=3))
  mods = 3 if gate else 2
  assert mod.w_mod[...].shape == (ADALN_DIM, mods * D)
  # Fresh: W_mod = b_mod = 0, the identity modulation with a unit gate.
  n = jax.random.normal(jax.random.key(1), (2, 5, D), jnp.float32)
  out, g = mod(n, 2)
  np.testing.assert_array_equal(out, n)
  if gate:
    np.testing.assert_array_equal(g, np.ones(n.shape, np.float32))
  else:
    assert g is None
  rng = np.random.default_rng(0)
  for name, std in (("w_mod", 0.4), ("b_mod", 0.2), ("b1", 0.3), ("b2", 0.3)):
    var = getattr(mod, name)
    var[...] = jnp.asarray(std * rng.standard_normal(var[...].shape), jnp.float32)
  p64 = ref.adaln_params(mod, np.float64)
  n64 = np.asarray(n, np.float64)
  traced = jax.jit(lambda n, k: mod(n, k))
  outs = []
  for k in (0, 1, 2, 5, 11):
    want, want_gate = ref.iter_adaln_ref(p64, n64, k, gate)
    for got, got_gate in (mod(n, k), traced(n, jnp.int32(k))):
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=f"k={k}")
      if gate:
        np.testing.assert_allclose(got_gate, want_gate, rtol=2e-5, atol=2e-6, err_msg=f"k={k}")
      else:
        assert got_gate is None
    outs.append(want)
    assert np.abs(want - n64).max() > 0.05  # the modulation is not a no-op
  # The iteration index matters.
  assert np.abs(outs[0] - outs[1]).max() > 1e-3 and np.abs(outs[1] - outs[4]).max() > 1e-3


def test_sinusoidal_encoding_written_out():
  from moejax.papers.loopmoe.iter_adaln import sinusoidal_encoding
  for k in (0, 1, 3, 9):
    pe = np.asarray(sinusoidal_encoding(k, PE_DIM), np.float64)
    want = np.concatenate([[math.sin(k * 10_000 ** (-2 * i / PE_DIM)) for i in range(PE_DIM // 2)],
                           [math.cos(k * 10_000 ** (-2 * i / PE_DIM)) for i in range(PE_DIM // 2)]])
    np.testing.assert_allclose(pe, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- #
# 2. Looped == unrolled: logits, losses, gradients
# --------------------------------------------------------------------------- #

@functools.lru_cache(maxsize=None)
def _zero_mod_unrolled(plan_name):
  """The unrolled reference on LoopMoE weights with W_mod = b_mod = 0: its
  modulation is the identity ((1 + 0) n + 0, gate 1), so this is the unrolled
  Loop Base of the same seed (and shares the compiled reference of the
  IterAdaLN case)."""
  cfg = _cfg(PLANS[plan_name], iter_adaln=True, **{"moe.bias_update_rate": BIAS_RATE})
  return _run(cfg, _model(cfg, random_mod=False), _tokens(), naive=True)


def _shared_only(grads, like):
  keys = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(like)}
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(grads)}
  assert keys <= set(flat)
  return {k: flat[k] for k in keys}


@pytest.mark.parametrize("iter_adaln", [True, False], ids=["iter_adaln", "loop_base"])
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_looped_equals_unrolled(plan_name, iter_adaln):
  got = _cached(plan_name, iter_adaln, naive=False)
  want = _cached(plan_name, True, naive=True) if iter_adaln else _zero_mod_unrolled(plan_name)
  np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
  assert np.abs(want["logits"]).max() > 0.5
  _assert_trees_close(got["state"], want["state"], rtol=0, atol=1e-6)
  if iter_adaln:
    _assert_trees_close(got["grads"], want["grads"], rtol=1e-4, atol=2e-5,
                        nonzero=["w_mod", "w_h", "w1", "b_mod", "wq", "w_gate", "kernel",
                                 "embed", "scale"])
  else:
    got_grads = {jax.tree_util.keystr(p): v
                 for p, v in jax.tree_util.tree_leaves_with_path(got["grads"])}
    assert not any("_mod'" in k for k in got_grads)
    _assert_trees_close(got_grads, _shared_only(want["grads"], got["grads"]), rtol=1e-4,
                        atol=2e-5, nonzero=["wq", "w_gate", "kernel", "embed", "scale"])
  # IterAdaLN is where it should be: only in the looped layers.
  prefix, block, _, _ = PLANS[plan_name]
  for path, _ in jax.tree_util.tree_leaves_with_path(got["grads"]):
    name = jax.tree_util.keystr(path)
    if "_mod'" in name:
      layer = int(name.split("['blocks'][")[1].split("]")[0])
      assert iter_adaln and prefix <= layer < prefix + block, name
  # The iterations do work: no two consecutive hidden states are alike.
  hidden = [np.asarray(h) for h in want["aux"]["hidden"]]
  assert len(hidden) == PLANS[plan_name][2] + 1
  for a, b in zip(hidden, hidden[1:]):
    assert np.abs(a - b).max() > 0.1


# --------------------------------------------------------------------------- #
# 3. Zero W_mod == Loop Base of the same seed
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("plan_name", list(PLANS))
def test_zero_w_mod_equals_loop_base(plan_name):
  cfg = _cfg(PLANS[plan_name], iter_adaln=True, **{"moe.bias_update_rate": BIAS_RATE})
  loop_moe = _model(cfg, random_mod=False)
  base_cfg = _cfg(PLANS[plan_name], iter_adaln=False, **{"moe.bias_update_rate": BIAS_RATE})
  base = _model(base_cfg)
  # Every weight the two share is the same: IterAdaLN draws from its own stream.
  mod_params = {jax.tree_util.keystr(p): v for p, v in
                jax.tree_util.tree_leaves_with_path(nnx.state(loop_moe, nnx.Param))}
  base_params = {jax.tree_util.keystr(p): v for p, v in
                 jax.tree_util.tree_leaves_with_path(nnx.state(base, nnx.Param))}
  assert set(base_params) < set(mod_params)
  assert all("_mod']" in k for k in set(mod_params) - set(base_params))
  for key, value in base_params.items():
    np.testing.assert_array_equal(mod_params[key], value, err_msg=key)
  for key in set(mod_params) - set(base_params):
    if "w_mod" in key or "b_mod" in key:
      assert not np.any(np.asarray(mod_params[key])), key

  # Train mode, router bias carried: the same logits, bias and gradients of the
  # shared weights as Loop Base.
  got = _run(cfg, loop_moe, _tokens(), naive=False)
  want = _cached(plan_name, False, naive=False)
  np.testing.assert_array_equal(got["logits"], want["logits"])
  _assert_trees_close(got["state"], want["state"], rtol=0, atol=0)
  grads = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(got["grads"])}
  for path, value in jax.tree_util.tree_leaves_with_path(want["grads"]):
    key = jax.tree_util.keystr(path)
    np.testing.assert_allclose(grads[key], value, rtol=1e-6, atol=1e-7 * np.abs(value).max(),
                               err_msg=key)
  # The zero W_mod still learns: its gradient is not zero.
  assert all(np.abs(v).max() > 0 for k, v in grads.items() if "w_mod" in k)
  # Nonzero W_mod: other logits.
  moved = _cached(plan_name, True, naive=False)
  assert np.abs(moved["logits"] - want["logits"]).max() > 1e-2


# --------------------------------------------------------------------------- #
# 4. Remat changes nothing
# --------------------------------------------------------------------------- #

def test_remat_equals_no_remat():
  got = _cached("p1b1r3s1", True, naive=False, remat=True)
  want = _cached("p1b1r3s1", True, naive=False)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-6, atol=1e-6)
  _assert_trees_close(got["grads"], want["grads"], rtol=1e-5, atol=1e-6)
  _assert_trees_close(got["state"], want["state"], rtol=0, atol=0)


# --------------------------------------------------------------------------- #
# 5. Model state carried across iterations (router bias)
# --------------------------------------------------------------------------- #

def _router_bias(state: dict, layer: int):
  return np.asarray(state["blocks"][layer]["ffn"]["router"]["bias"])


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_router_bias_carried_across_iterations(plan_name):
  prefix, block, reps, _ = PLANS[plan_name]
  got = _cached(plan_name, True, naive=False)
  want = _cached(plan_name, True, naive=True)
  # Every layer's bias after the forward pass: the naive sequential updates.
  _assert_trees_close(got["state"], want["state"], rtol=0, atol=1e-6)
  for layer in range(prefix, prefix + block):
    # The reference's bias after iteration k: R different vectors (each
    # iteration moved it), the last of which the looped model ends with.
    after = [_router_bias(s, layer) for s in want["aux"]["states"]]
    assert len(after) == reps
    assert np.abs(after[0]).max() > 0
    for a, b in zip(after, after[1:]):
      assert np.abs(a - b).max() > 0
    np.testing.assert_allclose(_router_bias(got["state"], layer), after[-1], atol=1e-7)
    # ... and iteration k routed with the bias iteration k - 1 left.
    key = f"expert_load/layer_{layer:02d}"
    for k in range(reps):
      np.testing.assert_allclose(got["aux"][f"{key}/iter_{k}"],
                                 want["aux"]["iter_aux"][k][layer - prefix][key], atol=1e-7)
  # Prefix layers ran before the loop: their bias moved once, then stayed.
  for layer in range(prefix):
    assert np.abs(_router_bias(got["state"], layer)).max() > 0
    for state in want["aux"]["states"]:
      np.testing.assert_array_equal(_router_bias(state, layer),
                                    _router_bias(got["state"], layer))


# --------------------------------------------------------------------------- #
# 6. Diagnostics
# --------------------------------------------------------------------------- #

def _entropy(p):
  p = np.asarray(p, np.float64)
  p = p / p.sum()
  return float(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)))


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_loop_diagnostics(plan_name):
  prefix, block, reps, _ = PLANS[plan_name]
  aux = _cached(plan_name, True, naive=False)["aux"]
  want = _cached(plan_name, True, naive=True)["aux"]
  hidden, iter_aux = want["hidden"], want["iter_aux"]

  cos = [ref.mean_cosine(hidden[k + 1], hidden[k]) for k in range(reps)]
  assert np.asarray(aux["loop/cos_consecutive"]).shape == (reps,)
  np.testing.assert_allclose(aux["loop/cos_consecutive"], cos, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["loop/cos_first"], cos[0], rtol=1e-5)
  np.testing.assert_allclose(aux["loop/cos_last"], cos[-1], rtol=1e-5)

  # Per-iteration routing statistics: [R], each the mean over the block's layers.
  for metric in ("load_entropy", "load_max_over_mean", "router_z", "dropped_fraction"):
    per_iter = [np.mean([a[metric] for a in iter_aux[k]]) for k in range(reps)]
    assert np.asarray(aux[f"loop/{metric}"]).shape == (reps,), metric
    np.testing.assert_allclose(aux[f"loop/{metric}"], per_iter, rtol=1e-5, err_msg=metric)
  assert len(set(np.round(np.asarray(aux["loop/load_entropy"]), 6))) > 1

  # Per-expert load of each iteration, and pooled over the iterations.
  pooled_entropies = []
  for j, layer in enumerate(range(prefix, prefix + block)):
    key = f"expert_load/layer_{layer:02d}"
    loads = [np.asarray(iter_aux[k][j][key]) for k in range(reps)]
    for k in range(reps):
      np.testing.assert_allclose(aux[f"{key}/iter_{k}"], loads[k], atol=1e-7)
    assert f"{key}/iter_{reps}" not in aux
    np.testing.assert_allclose(aux[key], np.mean(loads, axis=0), atol=1e-7)
    pooled_entropies.append(_entropy(np.mean(loads, axis=0)) / math.log(len(loads[0])))

  # Auxiliary losses: per iteration, summed (as over layers).
  for key in ("loss/load_balance", "loss/router_z"):
    looped = sum(float(a[key]) for it in iter_aux for a in it)
    others = sum(float(a[key]) for a in want["layer_aux"])
    np.testing.assert_allclose(aux[key], looped + others, rtol=1e-5, err_msg=key)
    per_iter = [sum(float(a[key]) for a in it) for it in iter_aux]
    assert min(per_iter) > 0 and len(set(np.round(per_iter, 7))) > 1

  # Normalised entropy of the load pooled over iterations (1 = uniform, as
  # load_entropy); with several looped layers, the mean over them.
  np.testing.assert_allclose(aux["loop/pooled_load_entropy"], np.mean(pooled_entropies),
                             rtol=1e-5)


# --------------------------------------------------------------------------- #
# 7. Budgets
# --------------------------------------------------------------------------- #

BUDGET_PLANS = [(1, 1, 3, 1), (0, 2, 2, 0), (2, 1, 4, 0), (0, 1, 2, 2), (1, 3, 2, 1)]


@pytest.mark.parametrize("plan", BUDGET_PLANS, ids=lambda p: "p%db%dr%ds%d" % p)
@pytest.mark.parametrize("iter_adaln,gate", [(True, True), (True, False), (False, True)],
                         ids=["adaln_gate", "adaln_nogate", "loop_base"])
def test_budget_params_and_flops(plan, iter_adaln, gate):
  prefix, block, reps, suffix = plan
  cfg = _cfg(plan, iter_adaln=iter_adaln, gate=gate, **{"moe.num_shared_experts": 1})
  model = nnx.eval_shape(lambda: Transformer(cfg, VOCAB, nnx.Rngs(params=0)))
  built = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  b = budget.model_budget(cfg, VOCAB)
  assert b["params"] == built

  # The same network unrolled: effective depth, no loop, no IterAdaLN.
  flat = copy.deepcopy(cfg)
  flat.model.num_layers = prefix + block * reps + suffix
  flat.loop.block_layers, flat.loop.prefix_layers, flat.loop.iterations = 0, 0, 1
  flat_b = budget.model_budget(flat, VOCAB)
  sites = 2 * block * reps if iter_adaln else 0
  adaln = sites * ref.adaln_matmul_flops(D, ADALN_DIM, gate)
  assert b["forward_flops_per_token"] == flat_b["forward_flops_per_token"] + adaln
  assert b["train_flops_per_token"] == 3 * b["forward_flops_per_token"]
  assert b["effective_layers"] == flat_b["effective_layers"] == flat.model.num_layers
  if iter_adaln:
    assert adaln > 0


# --------------------------------------------------------------------------- #
# 8. Sharded == unsharded
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("mesh_shape", [
    dict(data=2, fsdp=1, expert=4, tensor=1),
    pytest.param(dict(data=4, fsdp=2, expert=1, tensor=1), marks=pytest.mark.slow),
], ids=["data2_expert4", "data4_fsdp2"])
def test_looped_model_on_a_mesh_equals_single_device(mesh_shape, monkeypatch):
  plan_name = "p1b1r3s1"
  cfg = _cfg(PLANS[plan_name], **{"moe.bias_update_rate": BIAS_RATE})
  for axis, size in mesh_shape.items():
    cfg.mesh[axis] = size
  want = _cached(plan_name, True, naive=False)
  mesh = sharding.make_mesh(cfg.mesh)
  assert dict(mesh.shape) == mesh_shape
  calls = []
  real = moe_module.expert_parallel_ffn
  monkeypatch.setattr(moe_module, "expert_parallel_ffn",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  model = _model(cfg)
  # The weights really are split: the looped layer's experts over `expert`,
  # embedding dimensions over `fsdp`.
  specs = sharding.state_shardings(nnx.state(model, nnx.Param), mesh, cfg.sharding.rules)
  w_gate = specs["blocks"][1]["ffn"]["w_gate"].get_value().spec
  assert w_gate[0] == "expert" and w_gate[1] == "fsdp"
  got = _run(cfg, model, _tokens(), naive=False, mesh=mesh)
  # The expert-parallel exchange runs exactly when the mesh has an expert axis.
  assert bool(calls) == (mesh_shape["expert"] > 1)

  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
  np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=2e-5)
  assert set(got["aux"]) == set(want["aux"])
  for key in want["aux"]:
    np.testing.assert_allclose(got["aux"][key], want["aux"][key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  _assert_trees_close(got["state"], want["state"], rtol=0, atol=1e-6)
  _assert_trees_close(got["grads"], want["grads"], rtol=1e-4, atol=2e-5,
                      nonzero=["w_mod", "w_gate", "wq", "embed"])


# --------------------------------------------------------------------------- #
# 9. Train and eval calls under jit
# --------------------------------------------------------------------------- #

def test_train_and_eval_under_jit():
  """Eval-mode calls under jax.jit (forward only, through split/merge); the
  train-mode call under jax.jit is _run's (value_and_grad, as the train step)."""
  plan_name = "p1b1r3s1"
  cfg = _cfg(PLANS[plan_name], **{"moe.bias_update_rate": BIAS_RATE})
  tokens = _tokens()
  model = _model(cfg)
  state0 = _non_params(model)
  eval_fn = _forward_fn(model, train=False)

  eval_logits, aux = eval_fn(model, tokens)
  assert np.asarray(aux["loop/cos_consecutive"]).shape == (3,)
  assert np.isfinite(np.asarray(eval_logits)).all()
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(aux))
  # Evaluation leaves the state alone.
  _assert_trees_close(_non_params(model), state0, rtol=0, atol=0)

  got = _run(cfg, model, tokens, naive=False)
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(got))
  assert np.abs(_router_bias(got["state"], 1)).max() > 0
  # Train and eval logits differ: only the train call updates the bias between
  # iterations (both dispatch dropless), and iterations 1.. route with it.
  assert np.abs(got["logits"] - np.asarray(eval_logits)).max() > 1e-4

  # An eval call after the update reads the new bias.
  new_state = nnx.state(model, nnx.Not(nnx.Param))
  nnx.replace_by_pure_dict(new_state, got["state"])
  nnx.update(model, new_state)
  _assert_trees_close(_non_params(model), got["state"], rtol=0, atol=0)
  eval2, _ = eval_fn(model, tokens)
  assert np.abs(np.asarray(eval2) - np.asarray(eval_logits)).max() > 1e-4


def test_model_wide_metrics_weight_the_loop_by_its_layer_passes():
  from moejax.model.transformer import combine_aux
  plain = {"load_entropy": jnp.float32(0.5), "loss/load_balance": jnp.float32(1.0)}
  looped = {"load_entropy": jnp.float32(0.9), "loss/load_balance": jnp.float32(3.0)}
  out = combine_aux([plain, looped, plain], [1.0, 6.0, 1.0])
  assert float(out["load_entropy"]) == pytest.approx((0.5 + 6 * 0.9 + 0.5) / 8)
  assert float(out["loss/load_balance"]) == pytest.approx(5.0)  # losses add, unweighted
