"""Expert parallelism (shard_map + all_to_all) equals the single-device MoE layer.

On 8 fake CPU devices: meshes (data=2, expert=4), (fsdp=2, expert=4) and
(expert=2, tensor=2, data=2) against the same layer run without a mesh:
outputs, the load-balance loss, and gradients of every parameter and the input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import sharding
from moejax.model import sublayers
from tests.helpers import tiny_config
from tests.sharded_layer import loss_and_grads


def _layer_cfg(**moe):
  overrides = {"model.sublayer": "moe", "model.d_model": 32, "moe.num_experts": 8,
               "moe.top_k": 2, "moe.expert_ffn_dim": 16, "moe.load_balance_coef": 0.01,
               "moe.z_loss_coef": 1e-3}
  overrides.update({f"moe.{k}": v for k, v in moe.items()})
  return tiny_config(**overrides)


def _loss_and_grads(cfg, x, mesh=None):
  layer = sublayers.build(cfg, 1, nnx.Rngs(params=0))
  loss, y, aux, _, gp, gx = loss_and_grads(cfg, layer, x, mesh=mesh,
                                           aux_losses=("loss/load_balance",))
  return loss, y, aux, (gp, gx)


@pytest.mark.parametrize("mesh_shape", [
    dict(data=2, fsdp=1, expert=4, tensor=1),
    dict(data=1, fsdp=2, expert=4, tensor=1),
    dict(data=2, fsdp=1, expert=2, tensor=2),
])
@pytest.mark.parametrize("backend", ["sorted", "ragged_dot"])
def test_expert_parallel_equals_single_device(mesh_shape, backend):
  cfg = _layer_cfg(backend=backend, num_shared_experts=1)
  for axis, size in mesh_shape.items():
    cfg.mesh[axis] = size
  x = jax.random.normal(jax.random.PRNGKey(3), (8, 6, 32), jnp.float32)
  ref_loss, ref_y, ref_aux, (ref_gp, ref_gx) = _loss_and_grads(cfg, x)
  mesh = sharding.make_mesh(cfg.mesh)
  assert mesh.shape["expert"] == mesh_shape["expert"]
  loss, y, aux, (gp, gx) = _loss_and_grads(cfg, x, mesh)

  np.testing.assert_allclose(y, ref_y, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(aux["loss/load_balance"], ref_aux["loss/load_balance"], rtol=1e-6)
  np.testing.assert_allclose(aux["expert_load/layer_01"], ref_aux["expert_load/layer_01"], rtol=1e-6)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gx, ref_gx, rtol=2e-4, atol=2e-6)
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_gp))
  for path, g in jax.tree_util.tree_leaves_with_path(gp):
    np.testing.assert_allclose(g, flat_ref[path], rtol=2e-4, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_capped_send_buffer_reports_drops_and_eval_stays_dropless():
  # All tokens prefer expert 0 (on shard 0): a send buffer capped at the
  # balanced share must drop pairs, and say so; evaluation must not.
  cfg = _layer_cfg(ep_capacity_factor=1.0, top_k=1)
  cfg.mesh.data, cfg.mesh.expert = 2, 4
  layer = sublayers.build(cfg, 1, nnx.Rngs(params=0))
  kernel = np.zeros((32, 8), np.float32)
  kernel[:, 0] = 1.0
  layer.router.kernel[...] = jnp.asarray(kernel)
  x = jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (8, 6, 32)))
  ref_y, _ = layer(x, train=False)  # no mesh: dropless reference
  mesh = sharding.make_mesh(cfg.mesh)
  with sharding.use_mesh(mesh, cfg.sharding.rules):
    y_train, aux_train = jax.jit(lambda x: layer(x, train=True))(x)
    y_eval, aux_eval = jax.jit(lambda x: layer(x, train=False))(x)
  assert float(aux_train["dropped_fraction"]) > 0.5
  assert float(aux_eval["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(y_eval, ref_y, rtol=2e-5, atol=2e-6)
  assert not np.allclose(y_train, ref_y, atol=1e-4)
