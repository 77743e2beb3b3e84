"""Atomic expert parallelism (parallel.py) equals the single-device layer.

On 8 fake CPU devices: the OmniMoE layer on meshes (data=2, expert=4),
(fsdp=2, expert=4) and (data=2, expert=2, tensor=2), both expert paths on one
of them, and the PEER layer on one (more combinations under -m slow), under
`sharding.use_mesh` with parameters placed by `sharding.state_shardings`,
against the same layer run without a mesh: outputs, aux metrics, the BatchNorm
running statistics written by the train step (taken over the global batch), and
gradients of every parameter and of the input.

The BatchNorm statistics are written in train mode, so they are passed to the
differentiated function as an argument (closing over them, as
test_expert_parallel.py does for the MoE layer, makes nnx refuse the write
from an inner trace).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import sharding
from moejax.model import sublayers
from moejax.papers.omnimoe import atomic_layer
from tests.helpers import tiny_config
from tests.sharded_layer import loss_and_grads

D = 16


def _layer_cfg(sublayer, **atomic):
  overrides = {"model.sublayer": sublayer, "model.d_model": D, "atomic.num_experts": 64,
               "atomic.top_k": 4, "atomic.shared_ffn_dim": 24, "atomic.peer_query_dim": 8,
               "atomic.expert_init_std": 1.0}
  overrides.update({f"atomic.{k}": v for k, v in atomic.items()})
  return tiny_config(**overrides)


def _loss_and_grads(cfg, x, mesh=None):
  layer = sublayers.build(cfg, 1, nnx.Rngs(params=0))
  return loss_and_grads(cfg, layer, x, mesh=mesh)


_REFERENCE: dict = {}


def _reference(sublayer, atomic, x):
  """The no-mesh result (the mesh fields of the config do not change the layer)."""
  key = (sublayer, tuple(sorted(atomic.items())))
  if key not in _REFERENCE:
    _REFERENCE[key] = _loss_and_grads(_layer_cfg(sublayer, **atomic), x)
  return _REFERENCE[key]


MESHES = {
    "data2_expert4": dict(data=2, fsdp=1, expert=4, tensor=1),
    "fsdp2_expert4": dict(data=1, fsdp=2, expert=4, tensor=1),
    "data2_expert2_tensor2": dict(data=2, fsdp=1, expert=2, tensor=2),
}
CASES = [
    ("omnimoe", dict(path="gather"), "data2_expert4"),
    ("omnimoe", dict(path="gather"), "fsdp2_expert4"),
    ("omnimoe", dict(path="gather"), "data2_expert2_tensor2"),
    ("omnimoe", dict(path="expert_sorted"), "data2_expert4"),
    ("peer", dict(path="gather", peer_heads=2), "fsdp2_expert4"),
    # More combinations, excluded from the default run (-m slow).
    ("omnimoe", dict(path="expert_sorted", router="full"), "data2_expert2_tensor2", "slow"),
    ("omnimoe", dict(path="expert_sorted"), "fsdp2_expert4", "slow"),
    ("peer", dict(path="expert_sorted", peer_heads=1), "data2_expert2_tensor2", "slow"),
    ("peer", dict(path="gather", peer_heads=2), "data2_expert4", "slow"),
]


def _param(sublayer, atomic, mesh_name, *slow):
  name = f"{sublayer}-{'-'.join(map(str, atomic.values()))}-{mesh_name}"
  return pytest.param(sublayer, atomic, mesh_name, id=name,
                      marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("sublayer, atomic, mesh_name", [_param(*c) for c in CASES])
def test_atomic_expert_parallel_equals_single_device(sublayer, atomic, mesh_name, monkeypatch):
  calls = []
  real = atomic_layer.atomic_expert_parallel
  monkeypatch.setattr(atomic_layer, "atomic_expert_parallel",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  mesh_shape = MESHES[mesh_name]
  x = jax.random.normal(jax.random.PRNGKey(3), (8, 4, D), jnp.float32)
  ref_loss, ref_y, ref_aux, ref_stats, ref_gp, ref_gx = _reference(sublayer, atomic, x)
  cfg = _layer_cfg(sublayer, **atomic)
  for axis, size in mesh_shape.items():
    cfg.mesh[axis] = size
  mesh = sharding.make_mesh(cfg.mesh)
  assert dict(mesh.shape) == mesh_shape
  loss, y, aux, stats, gp, gx = _loss_and_grads(cfg, x, mesh)
  assert calls, "the layer did not take the expert-parallel path"

  np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  for key in ("gate_mass", "dead_fraction", "load_entropy"):
    np.testing.assert_allclose(aux[key], ref_aux[key], rtol=1e-5, err_msg=key)
  # BatchNorm statistics over the global batch, not per shard.
  flat_ref_stats = dict(jax.tree_util.tree_leaves_with_path(ref_stats))
  assert flat_ref_stats
  for path, v in jax.tree_util.tree_leaves_with_path(stats):
    np.testing.assert_allclose(v, flat_ref_stats[path], rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  np.testing.assert_allclose(gx, ref_gx, rtol=2e-4, atol=2e-6)
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_gp))
  flat = jax.tree_util.tree_leaves_with_path(gp)
  assert len(flat) == len(flat_ref)
  for path, g in flat:
    np.testing.assert_allclose(g, flat_ref[path], rtol=2e-4, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))
  # The comparison is not vacuous: every table gets a gradient from some token.
  for name in ("expert_in", "expert_out"):
    assert np.abs(np.asarray(gp[name])).max() > 0, name
