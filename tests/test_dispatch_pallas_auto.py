"""The `pallas` and `auto` dispatch backends inside the MoE layer.

The kernels themselves are checked against their references in
tests/test_pallas_*.py, and the pallas backend against the per-token loop in
tests/test_dispatch_backends.py. Here: `auto` resolves to the table's choice
for each platform and to a concrete name when a layer is built; a layer on the
pallas backend equals the same layer on `sorted` (values, aux, gradients);
and under a device mesh (batch and tensor axes, through shard_map; expert
axis, through the all-to-all exchange) it equals one device.
"""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax.moe import dispatch
from moejax.moe.dispatch import auto
from moejax.model import sublayers
from moejax.sharding import make_mesh
from tests.helpers import tiny_config
from tests.sharded_layer import loss_and_grads


def test_auto_resolves_per_platform_and_names_its_evidence():
  assert dispatch.resolve_backend("auto", "cpu") == "sorted"
  # Only measured winners: platforms without a committed measurement get `sorted`.
  for platform, c in auto.FASTEST.items():
    if c.evidence.startswith("unmeasured"):
      assert c.backend == "sorted", platform
  assert dispatch.resolve_backend("auto", "some_new_chip") == auto.FALLBACK.backend
  assert dispatch.resolve_backend("ragged_dot", "gpu") == "ragged_dot"
  for platform, c in auto.FASTEST.items():
    assert c.backend in dispatch.DROPLESS and c.backend != "auto", platform
    assert c.evidence.startswith(("measured:", "unmeasured")), platform
  # The CPU entry cites a committed results file.
  path = auto.FASTEST["cpu"].evidence.split(": ", 1)[1]
  assert os.path.exists(os.path.join(os.path.dirname(__file__), "..", path)), path


def _cfg(backend, **extra):
  overrides = {"model.sublayer": "moe", "model.d_model": 16, "moe.num_experts": 8,
               "moe.top_k": 2, "moe.expert_ffn_dim": 8, "moe.backend": backend}
  overrides.update(extra)
  return tiny_config(**overrides)


def _x():
  return jax.numpy.asarray(np.random.default_rng(3).normal(size=(8, 6, 16)), np.float32)


def test_auto_layer_is_built_with_a_concrete_backend():
  cfg = _cfg("auto")
  config_lib.validate(cfg, num_devices=1, check_data=False)
  layer = sublayers.build(cfg, 0, nnx.Rngs(0))
  assert layer.backend == dispatch.resolve_backend("auto") != "auto"


def _close_tree(got, want, rtol=2e-5):
  for path, g, w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(got),
                        jax.tree.leaves(want)):
    scale = max(float(np.max(np.abs(w))) if np.size(w) else 0.0, 1e-6)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=rtol * scale,
                               err_msg=str(path[0]))


def _run(backend, mesh_axes=None, **extra):
  cfg = _cfg(backend, **extra)
  layer = sublayers.build(cfg, 0, nnx.Rngs(0))
  mesh = None
  if mesh_axes:
    for name, size in mesh_axes.items():
      setattr(cfg.mesh, name, size)
    mesh = make_mesh(cfg.mesh, jax.devices()[:int(np.prod(list(mesh_axes.values())))])
  return loss_and_grads(cfg, layer, _x(), mesh=mesh, aux_losses=("loss/load_balance",))


def test_pallas_layer_equals_sorted_layer():
  loss_p, y_p, aux_p, _, gp_p, gx_p = _run("pallas")
  loss_s, y_s, aux_s, _, gp_s, gx_s = _run("sorted")
  np.testing.assert_allclose(loss_p, loss_s, rtol=1e-5)
  _close_tree(y_p, y_s)
  _close_tree(aux_p, aux_s)
  _close_tree(gp_p, gp_s)
  _close_tree(gx_p, gx_s)


@pytest.mark.parametrize("mesh_axes", [
    {"data": 2, "tensor": 2},
    {"data": 2, "expert": 4},
])
def test_pallas_layer_on_a_mesh_equals_one_device(mesh_axes):
  want = _run("pallas")
  got = _run("pallas", mesh_axes)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip((got[1], got[4], got[5]), (want[1], want[4], want[5])):
    _close_tree(g, w, rtol=1e-4)
