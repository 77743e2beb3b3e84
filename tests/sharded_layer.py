"""One layer's loss and gradients, with or without a device mesh (for the
"sharded equals unsharded" tests of every sublayer).

The loss is sum(y * P) for a fixed dense projection P (so every output element
matters) plus the named auxiliary losses. Model state (router bias, BatchNorm
statistics) is copied into fresh variables inside the differentiated function,
as the train step does: a train-mode call writes it, and nnx refuses writes to
variables of an outer trace.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import sharding


def loss_and_grads(cfg, layer, x, *, mesh=None, aux_losses=(), **call_kwargs):
  """-> host copies of (loss, y, aux, new model state as a pure dict,
  parameter gradients, x gradient)."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss_fn(params, rest, x):
    rest = jax.tree.map(lambda v: v, rest)
    model = nnx.merge(graphdef, params, rest)
    y, aux = model(x, train=True, **call_kwargs)
    proj = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
    loss = jnp.sum(y * proj) + sum(aux[k] for k in aux_losses)
    return loss, (y, aux, nnx.state(model, nnx.Not(nnx.Param)))

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True))
  if mesh is None:
    (loss, (y, aux, new_rest)), (gp, gx) = grad_fn(params, rest, x)
  else:
    rules = cfg.sharding.rules
    with sharding.use_mesh(mesh, rules):
      params = jax.device_put(params, sharding.state_shardings(params, mesh, rules))
      rest = jax.device_put(rest, sharding.state_shardings(rest, mesh, rules))
      x = jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_AXES, None, None)))
      (loss, (y, aux, new_rest)), (gp, gx) = grad_fn(params, rest, x)
  return jax.device_get((loss, y, aux, nnx.to_pure_dict(new_rest), gp, gx))


def assert_same_layer_results(got, want, *, y_tol=(2e-5, 2e-6), grad_tol=(2e-4, 2e-6)):
  """Two loss_and_grads results agree: y, loss, every aux entry, dx and every
  parameter gradient (matched by path). Tolerances are (rtol, atol)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  loss, y, aux, _, gp, gx = got
  ref_loss, ref_y, ref_aux, _, ref_gp, ref_gx = want
  np.testing.assert_allclose(y, ref_y, rtol=y_tol[0], atol=y_tol[1])
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
  for key in ref_aux:
    np.testing.assert_allclose(aux[key], ref_aux[key], rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(gx, ref_gx, rtol=grad_tol[0], atol=grad_tol[1])
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_gp))
  flat = jax.tree_util.tree_leaves_with_path(gp)
  assert len(flat) == len(flat_ref)
  for p, g in flat:
    np.testing.assert_allclose(g, flat_ref[p], rtol=grad_tol[0], atol=grad_tol[1],
                               err_msg=jax.tree_util.keystr(p))
