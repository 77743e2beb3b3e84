"""The `pallas` backend: the routed SwiGLU through pallas_kernels/moe_ffn.py.

On GPU the permutation is fused into the grouped matmuls (rows gathered on
load, outputs scatter-added with their combine weights on store); on TPU the
Mosaic grouped matmul runs on rows permuted by XLA; on CPU the same kernels run
in Pallas interpret mode (correct, slow: for tests).

A pallas_call is one opaque op to XLA's partitioner: under a mesh it would
gather every operand onto each device. So under an active mesh the kernel runs
inside jax.shard_map, per device: tokens split over the batch axes (data,
fsdp, expert), expert weights whole except their hidden width, which `tensor`
splits (the partial outputs are summed over `tensor`). Expert parallelism
(an `expert` axis > 1) goes through expert_parallel.py instead, which calls
this backend on each shard's received rows.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import sharding
from moejax.sharding import BATCH_AXES


def _kernel_ffn(x, expert_idx, combine_weights, w_gate, w_up, w_down):
  from pallas_kernels.moe_ffn import moe_ffn  # pylint: disable=import-outside-toplevel
  return moe_ffn(x, expert_idx, combine_weights, w_gate, w_up, w_down)


def expert_rows_pallas(x, expert_idx, combine_weights, w_gate, w_up, w_down):
  """Same contract as the other dropless backends: y [T, d] in x.dtype."""
  mesh = sharding.active_mesh()
  if mesh is None or mesh.size == 1 or mesh.shape["expert"] > 1:
    return _kernel_ffn(x, expert_idx, combine_weights, w_gate, w_up, w_down)
  batch = P(BATCH_AXES, None)
  width_in, width_out = P(None, None, "tensor"), P(None, "tensor", None)

  def per_device(x, idx, cw, wg, wu, wd):
    y = _kernel_ffn(x, idx, cw, wg, wu, wd)
    return jax.lax.psum(y.astype(jnp.float32), "tensor").astype(x.dtype)

  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(batch, batch, batch, width_in, width_in, width_out),
                       out_specs=batch, check_vma=False)(
                           x, expert_idx, combine_weights, w_gate, w_up, w_down)
