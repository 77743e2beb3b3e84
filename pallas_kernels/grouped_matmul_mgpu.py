"""The Mosaic-GPU variant of the grouped matmul: JAX's own Hopper kernels, our VJP.

jax ships Mosaic-GPU grouped matmuls for Hopper
(jax.experimental.pallas.ops.gpu): `ragged_dot_mgpu.ragged_dot` (a persistent
kernel, one program per SM, TMA loads and WGMMA over K, group-exact TMA
stores) and `transposed_ragged_dot_mgpu.transposed_ragged_dot` (the weight
gradient, contracting over each group's rows). We call them, we do not copy
them: this file only maps our grouped-matmul contract onto theirs so that
benchmarks/kernels.py can measure them against our Triton-dialect variant in
one run and `variant="mgpu"` can be chosen where they win:

    forward  y  = ragged_dot(x, W, sizes)
    dx          = ragged_dot(dy, W, sizes, transpose_rhs=True)   (no W^T copy)
    dW          = transposed_ragged_dot(x, dy, sizes)            (x [M, K], dy [M, N])

They need a Hopper GPU (sm_90a) and jax >= 0.10.2; they do not run in CPU
interpret mode here (Mosaic GPU's interpreter is private and experimental), so
this variant is untested in CI and unmeasured until a GPU is lent. Their
constraints: lhs and rhs share a dtype; K % block_k == 0 for the forward;
for the weight gradient K % block_m == 0 and N % block_n == 0.
"""

import functools

import jax
import jax.numpy as jnp

# Block sizes from the search spaces in the kernels' own `main` functions;
# benchmarks/kernels.py is where to tune them once a GPU is at hand.
FORWARD_BLOCKS = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4,
                      grid_block_n=1)
WEIGHT_GRAD_BLOCKS = dict(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2,
                          grid_block_n=1)


def gmm_mgpu(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, out_dtype=None):
  """lhs [M, K] @ rhs[g] ([G, K, N], or [G, N, K] with transpose_rhs) per group."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # pylint: disable=import-outside-toplevel
  out = ragged_dot_mgpu.ragged_dot(lhs, rhs.astype(lhs.dtype),
                                   group_sizes=group_sizes.astype(jnp.int32),
                                   transpose_rhs=transpose_rhs, **FORWARD_BLOCKS)
  # Its grid assumes the groups cover every row: rows past them are never written.
  covered = jnp.arange(lhs.shape[0]) < jnp.sum(group_sizes)
  return jnp.where(covered[:, None], out, 0).astype(out_dtype or lhs.dtype)


def tgmm_mgpu(lhs, dout, group_sizes, *, out_dtype=None):
  """dW[g] = lhs_g^T dout_g: lhs [M, K], dout [M, N] -> [G, K, N]."""
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu  # pylint: disable=import-outside-toplevel
  out = transposed_ragged_dot_mgpu.transposed_ragged_dot(
      lhs, dout.astype(lhs.dtype), group_sizes=group_sizes.astype(jnp.int32),
      **WEIGHT_GRAD_BLOCKS)
  return out.astype(out_dtype or jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def grouped_matmul_mgpu(lhs, rhs, group_sizes, transpose_rhs: bool = False, out_dtype=None):
  """grouped_matmul's contract on these kernels, with the backward above."""
  return gmm_mgpu(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype)


def _fwd(lhs, rhs, group_sizes, transpose_rhs, out_dtype):
  return (grouped_matmul_mgpu(lhs, rhs, group_sizes, transpose_rhs, out_dtype),
          (lhs, rhs, group_sizes))


def _bwd(transpose_rhs, out_dtype, residuals, dout):
  del out_dtype
  lhs, rhs, group_sizes = residuals
  dout = dout.astype(lhs.dtype)
  dlhs = gmm_mgpu(dout, rhs, group_sizes, transpose_rhs=not transpose_rhs, out_dtype=lhs.dtype)
  if transpose_rhs:   # rhs [G, N, K]: drhs[g] = dout_g^T lhs_g
    drhs = tgmm_mgpu(dout, lhs, group_sizes, out_dtype=rhs.dtype)
  else:
    drhs = tgmm_mgpu(lhs, dout, group_sizes, out_dtype=rhs.dtype)
  return dlhs, drhs, None


grouped_matmul_mgpu.defvjp(_fwd, _bwd)
