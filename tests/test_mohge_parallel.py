"""The MoHGE layer on a mesh equals the same layer without one.

On 8 fake CPU devices: meshes (data=2, expert=4), (fsdp=2, expert=2) and
(data=2, expert=2, tensor=2) with 4 experts per group (the ragged_dot local
backend; the sorted one, and 2 experts per group, are marked slow),
against the layer run without a mesh: outputs, both auxiliary losses, the
per-expert load and active-parameter metrics, and gradients of every parameter
and of the input (follows tests/test_expert_parallel.py).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import config as config_lib
from moejax import sharding
from moejax.errors import ConfigError
from moejax.papers.mohge import mohge as mohge_module
from moejax.model import sublayers
from tests.helpers import tiny_config
from tests.sharded_layer import loss_and_grads

D = 32
STEP = 7  # steps=10, start fraction 0.5: the group loss is on


def _cfg(experts_per_group, backend):
  overrides = {"model.sublayer": "mohge", "model.d_model": D, "model.init_std": 0.25,
               "train.steps": 10, "mohge.group_widths": (8, 12, 16, 20),
               "mohge.experts_per_group": experts_per_group, "mohge.top_groups": 2,
               "mohge.top_k": 3, "mohge.shared_ffn_dim": 16, "mohge.gate": "megatron",
               "mohge.backend": backend, "mohge.group_aux_coef": 0.3,
               "mohge.intra_aux_coef": 0.2, "mohge.group_aux_start_fraction": 0.5}
  return tiny_config(**overrides)


def _layer(cfg):
  layer = sublayers.build(cfg, 2, nnx.Rngs(params=0))
  rng = np.random.default_rng(5)
  for name in ("group_router", "expert_router"):
    var = getattr(layer, name)
    var[...] = jnp.asarray(2.0 / math.sqrt(D) * rng.normal(size=var[...].shape), jnp.float32)
  return layer


def _x():
  return jax.random.normal(jax.random.PRNGKey(3), (8, 4, D), jnp.float32)


def _loss_and_grads(cfg, x, mesh=None):
  loss, y, aux, _, gp, gx = loss_and_grads(
      cfg, _layer(cfg), x, mesh=mesh, aux_losses=("loss/intra_group", "loss/group_balance"),
      step=jnp.int32(STEP))
  return loss, y, aux, (gp, gx)


@functools.lru_cache(maxsize=None)
def _single_device(experts_per_group, backend):
  return _loss_and_grads(_cfg(experts_per_group, backend), _x())


@pytest.mark.parametrize("mesh_shape,experts_per_group,backend", [
    (dict(data=2, fsdp=1, expert=4, tensor=1), 4, "ragged_dot"),
    (dict(data=2, fsdp=2, expert=2, tensor=1), 4, "ragged_dot"),
    (dict(data=2, fsdp=1, expert=2, tensor=2), 4, "ragged_dot"),
    # The sorted local backend (slow to compile on CPU).
    pytest.param(dict(data=2, fsdp=1, expert=4, tensor=1), 4, "sorted", marks=pytest.mark.slow),
    pytest.param(dict(data=2, fsdp=1, expert=2, tensor=2), 2, "sorted", marks=pytest.mark.slow),
])
def test_mohge_on_a_mesh_equals_single_device(mesh_shape, experts_per_group, backend,
                                              monkeypatch):
  cfg = _cfg(experts_per_group, backend)
  for axis, size in mesh_shape.items():
    cfg.mesh[axis] = size
  ref_loss, ref_y, ref_aux, (ref_gp, ref_gx) = _single_device(experts_per_group, backend)
  mesh = sharding.make_mesh(cfg.mesh)
  assert dict(mesh.shape) == mesh_shape
  # The expert-parallel exchange really runs (not GSPMD on the unsharded path).
  calls = []
  real = mohge_module.exchange_ffn
  monkeypatch.setattr(mohge_module, "exchange_ffn",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  loss, y, aux, (gp, gx) = _loss_and_grads(cfg, _x(), mesh)
  assert calls, "MoHGE did not take the expert-parallel path"

  # The parameters really are split: expert stacks over `expert` (and `tensor`).
  params = nnx.state(_layer(cfg), nnx.Param)
  spec = sharding.state_shardings(params, mesh, cfg.sharding.rules)["groups"][0]["w_gate"]
  assert spec.get_value().spec[0] == "expert"

  np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-6)
  assert set(aux) == set(ref_aux)
  for key in ref_aux:
    np.testing.assert_allclose(aux[key], ref_aux[key], rtol=1e-5, atol=1e-7, err_msg=key)
  assert float(ref_aux["loss/group_balance"]) > 0 and float(ref_aux["loss/intra_group"]) > 0
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gx, ref_gx, rtol=2e-4, atol=2e-6)
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_gp))
  leaves = jax.tree_util.tree_leaves_with_path(gp)
  assert len(leaves) == len(flat_ref) == 2 + 4 * 3 + 3  # routers, 4 groups, shared
  for path, g in leaves:
    np.testing.assert_allclose(g, flat_ref[path], rtol=2e-4, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))
    assert np.abs(flat_ref[path]).max() > 0, jax.tree_util.keystr(path)


def test_width_not_divisible_by_tensor_is_rejected():
  cfg = _cfg(4, "ragged_dot")
  cfg.mohge.group_widths = (8, 12, 16, 21)
  cfg.mesh.data, cfg.mesh.expert, cfg.mesh.tensor = 2, 2, 2
  with pytest.raises(ConfigError, match=r"must all be divisible by the tensor mesh axis \(2\)"):
    config_lib.validate(cfg, num_devices=8, check_data=False)
