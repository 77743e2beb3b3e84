"""Mesh construction, logical rules, and sharded == single-device training."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moejax.config.base import DEFAULT_SHARDING_RULES
from moejax import sharding
from moejax.errors import ConfigError
from moejax.optim import make_optimizer
from moejax.train import StateSpec, make_train_step
from tests.helpers import tiny_config


def test_logical_rules_map_to_mesh_axes_once():
  rules = DEFAULT_SHARDING_RULES
  assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("batch", "seq", "act_embed"), rules) == P(
      ("data", "fsdp", "expert"), None, None)
  # 'embed' wants fsdp, already taken by 'batch': it stays replicated.
  assert sharding.logical_to_spec(("batch", "embed"), rules) == P(("data", "fsdp", "expert"), None)
  assert sharding.logical_to_spec(("unknown_name",), rules) == P(None)


def test_mesh_shape_fill_and_errors():
  cfg = tiny_config(**{"mesh.data": -1, "mesh.fsdp": 2, "mesh.tensor": 2})
  assert sharding.resolve_mesh_shape(cfg.mesh, 8) == (2, 2, 1, 2)
  with pytest.raises(ConfigError, match="does not divide"):
    sharding.resolve_mesh_shape(cfg.mesh, 6)
  cfg = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1})
  with pytest.raises(ConfigError, match="has 4 devices but 8 are available"):
    sharding.resolve_mesh_shape(cfg.mesh, 8)
  cfg = tiny_config(**{"mesh.data": -1, "mesh.fsdp": -1})
  with pytest.raises(ConfigError, match="At most one mesh axis"):
    sharding.resolve_mesh_shape(cfg.mesh, 8)


def _batches(cfg, n, seed=0):
  rng = np.random.default_rng(seed)
  b, s = cfg.train.global_batch, cfg.data.seq_len
  out = []
  for _ in range(n):
    # A learnable chain: next = (7 * token + 3) mod 264 from a random start.
    tokens = np.empty((b, s + 1), np.int32)
    tokens[:, 0] = rng.integers(0, 264, size=b)
    for t in range(s):
      tokens[:, t + 1] = (7 * tokens[:, t] + 3) % 264
    seg = np.ones((b, s), np.int32)
    seg[:, s // 2:] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(s // 2), np.arange(s - s // 2)])[None].repeat(b, 0)
    out.append(dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg,
                    positions=pos.astype(np.int32), weights=np.ones((b, s), np.float32)))
  return out


def _train_losses(cfg, devices, batches):
  mesh = sharding.make_mesh(cfg.mesh, devices)
  with sharding.use_mesh(mesh, cfg.sharding.rules):
    spec = StateSpec(cfg, 264, mesh, make_optimizer(cfg.train))
    state = spec.init()
    step = make_train_step(spec, cfg)
    losses = []
    for b in batches:
      state, m = step(state, {k: jax.device_put(v, sharding.batch_sharding(mesh))
                              for k, v in b.items()})
      losses.append(float(m["loss"]))
    w = state["params"]["blocks"][0]["ffn"]["w_gate"]
    params = jax.device_get(jax.tree.leaves(state["params"]))
  return np.array(losses), params, w[...].sharding.spec


def test_2x2x2_mesh_equals_one_device_over_several_steps():
  assert jax.device_count() == 8, "conftest must force 8 CPU devices"
  cfg1 = tiny_config(**{"mesh.data": 1})
  cfg8 = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  batches = _batches(cfg1, 6)
  l1, p1, _ = _train_losses(cfg1, jax.devices()[:1], batches)
  l8, p8, spec8 = _train_losses(cfg8, jax.devices(), batches)
  assert spec8 == P("fsdp", "tensor")  # really sharded
  assert l1[-1] < l1[0]  # and really training
  np.testing.assert_allclose(l8, l1, rtol=2e-5, atol=2e-5)
  for a, b in zip(p1, p8):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
