"""The grouped matmul as one differentiable op over the Pallas kernels.

    out[r] = lhs[r] @ rhs[g(r)]        rows r of group g; 0 past sum(group_sizes)
    dlhs   = gmm(dout, rhs, transpose_rhs=True)   (reads rhs transposed in the kernel)
    drhs   = tgmm(lhs, dout),  drhs[g] = lhs_g^T dout_g

(with transpose_rhs, rhs is [G, N, K], dlhs = gmm(dout, rhs) and drhs = tgmm(dout, lhs)).

A MoE layer runs three grouped matmuls (gate, up, down) over the same row
grouping, and each has a forward and two backward kernels. The visit lists
those kernels walk depend only on the group sizes and the row tile, so
`make_plan` builds them once (the forward/input-gradient list and the
weight-gradient list, which also visits empty groups) and every call that is
given the plan through `metadata=` reuses it, forward and backward.

Shapes the kernels cannot take directly are padded here and sliced back (the
pad and slice are ordinary JAX, so their gradients are too):
  * rows to a multiple of tm (padded rows fall in the zero tail);
  * gpu only: K or N that is not a multiple of 16 is zero-padded to one,
    because Triton blocks are powers of two of at least 16 along a dot (this
    copies lhs and rhs; keep K and N multiples of 16 to avoid it).
tiling = (tm, tk, tn), default DEFAULT_TILING[variant] (tm shrunk for few rows):
tm is used as given (rows are padded to it); tk and tn are preferred sizes,
cut to the largest power of two that divides K and N (fit_tile). On a
compiled TPU a tile that is not a multiple of 128 becomes the whole
dimension (the Mosaic layout rule). Inputs of two dtypes are
promoted to one; products accumulate in float32; the output has
preferred_element_type, or the inputs' dtype. The backward casts dout to the
inputs' dtype before its kernels.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.group_metadata import GroupMetadata, make_group_metadata
from pallas_kernels.grouped_matmul_gpu import gmm_gpu, tgmm_gpu
from pallas_kernels.grouped_matmul_mgpu import grouped_matmul_mgpu
from pallas_kernels.grouped_matmul_tpu import gmm_tpu, tgmm_tpu

# gpu: 128 x 128 output tiles (8 warps). An estimate, not a measurement: 64^3 tiles move
# about 32 FLOP per byte from L2, which would cap an H100 near half of peak. Untuned.
DEFAULT_TILING = {"gpu": (128, 64, 128), "tpu": (128, 512, 512)}
GPU_MIN_TILE = 16       # Triton's smallest dot operand dimension
TPU_LANES = 128         # Mosaic: a block's last two dims are multiples of (8, 128) or whole
TPU_SUBLANES = 8
_KERNELS = {"gpu": (gmm_gpu, tgmm_gpu), "tpu": (gmm_tpu, tgmm_tpu)}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["forward", "weight_grad"],
                   meta_fields=["row_tile", "num_rows"])
@dataclasses.dataclass(frozen=True)
class GroupedMatmulPlan:
  """The visit lists of one row grouping, shared by every grouped matmul over it.

  forward: visits for gmm (the forward and the input gradient); weight_grad:
  the same with one visit per empty group, for tgmm. num_rows is the padded
  row count (a multiple of row_tile)."""
  forward: GroupMetadata
  weight_grad: GroupMetadata
  row_tile: int
  num_rows: int

  @property
  def num_groups(self) -> int:
    return self.forward.offsets.shape[0] - 1


def default_row_tile(variant: str, num_rows: int) -> int:
  """The variant's preferred tm, shrunk (to a power of two >= 16) for few rows."""
  preferred = DEFAULT_TILING[variant][0]
  return min(preferred, max(GPU_MIN_TILE, platform.next_power_of_two(num_rows)))


def make_plan(group_sizes: jax.Array, num_rows: int, *, tiling=None,
              variant: str | None = None) -> GroupedMatmulPlan:
  """Both visit lists for rows [0, num_rows) grouped by group_sizes [G].

  Pass the same tiling (only tm matters) and variant as to grouped_matmul.
  Groups are cut at num_rows; rows past sum(group_sizes) are the zero tail."""
  variant, _ = platform.resolve(variant, True)
  row_tile = tiling[0] if tiling is not None else default_row_tile(variant, num_rows)
  if row_tile <= 0:
    raise ValueError(f"Row tile tm={row_tile} must be positive.")
  padded_rows = platform.round_up(num_rows, row_tile)
  sizes = jnp.asarray(group_sizes, jnp.int32)
  if sizes.ndim != 1:
    raise ValueError(f"group_sizes must be 1-D [G], got shape {sizes.shape}.")
  ends = jnp.minimum(jnp.cumsum(sizes), num_rows)
  sizes = jnp.diff(ends, prepend=0).astype(jnp.int32)
  forward = make_group_metadata(sizes, padded_rows, row_tile)
  weight_grad = make_group_metadata(sizes, padded_rows, row_tile, visit_empty_groups=True)
  return GroupedMatmulPlan(forward, weight_grad, row_tile, padded_rows)


def _fit_dim(variant: str, dim: int, preferred: int, interpret: bool) -> tuple[int, int]:
  """(tile, padded dim) along K or N for a variant."""
  if variant == "gpu":
    padded = dim if dim % GPU_MIN_TILE == 0 else platform.round_up(dim, GPU_MIN_TILE)
    floor = 1 if interpret else GPU_MIN_TILE
    return platform.fit_tile(padded, max(preferred, floor)), padded
  tile = platform.fit_tile(dim, preferred)
  if not interpret and tile % TPU_LANES:
    tile = dim
  return tile, dim


def _check_row_tile(variant: str, row_tile: int, interpret: bool) -> None:
  if variant == "gpu" and not platform.is_power_of_two(row_tile):
    raise ValueError(f"Row tile tm={row_tile} must be a power of two for the gpu variant.")
  if variant == "gpu" and not interpret and row_tile < GPU_MIN_TILE:
    raise ValueError(f"Row tile tm={row_tile} must be at least {GPU_MIN_TILE} on a GPU.")
  if variant == "tpu" and not interpret and row_tile % TPU_SUBLANES:
    raise ValueError(f"Row tile tm={row_tile} must be a multiple of {TPU_SUBLANES} on a TPU.")


def gmm(lhs, rhs, meta: GroupMetadata, *, variant: str, tiling, transpose_rhs=False,
        out_dtype=None, interpret: bool = False) -> jax.Array:
  """The forward kernel of a variant on already padded operands (see *_tpu / *_gpu)."""
  return _KERNELS[variant][0](lhs, rhs, meta, tiling=tiling, transpose_rhs=transpose_rhs,
                              out_dtype=out_dtype, interpret=interpret)


def tgmm(lhs, dout, meta: GroupMetadata, *, variant: str, num_groups: int, tiling,
         out_dtype=None, interpret: bool = False) -> jax.Array:
  """The weight-gradient kernel of a variant on already padded operands."""
  return _KERNELS[variant][1](lhs, dout, meta, num_groups=num_groups, tiling=tiling,
                              out_dtype=out_dtype, interpret=interpret)


class _Config(NamedTuple):
  variant: str
  interpret: bool
  tiling: tuple[int, int, int]
  transpose_rhs: bool
  out_dtype: jnp.dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul(lhs, rhs, plan: GroupedMatmulPlan, config: _Config):
  return gmm(lhs, rhs, plan.forward, variant=config.variant, tiling=config.tiling,
             transpose_rhs=config.transpose_rhs, out_dtype=config.out_dtype,
             interpret=config.interpret)


def _grouped_matmul_fwd(lhs, rhs, plan, config):
  return _grouped_matmul(lhs, rhs, plan, config), (lhs, rhs, plan)


def _grouped_matmul_bwd(config, residuals, dout):
  lhs, rhs, plan = residuals
  tm, tk, tn = config.tiling
  dout = dout.astype(lhs.dtype)
  run = dict(variant=config.variant, interpret=config.interpret)
  # dlhs contracts over N (tile tn) and writes K (tile tk).
  dlhs = gmm(dout, rhs, plan.forward, tiling=(tm, tn, tk),
             transpose_rhs=not config.transpose_rhs, out_dtype=lhs.dtype, **run)
  if config.transpose_rhs:   # rhs [G, N, K]: drhs[g] = dout_g^T lhs_g
    drhs = tgmm(dout, lhs, plan.weight_grad, num_groups=plan.num_groups, tiling=(tm, tn, tk),
                out_dtype=rhs.dtype, **run)
  else:
    drhs = tgmm(lhs, dout, plan.weight_grad, num_groups=plan.num_groups, tiling=(tm, tk, tn),
                out_dtype=rhs.dtype, **run)
  return dlhs, drhs, None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   metadata: GroupedMatmulPlan | None = None, tiling=None,
                   variant: str | None = None, interpret: bool | None = None,
                   preferred_element_type=None, transpose_rhs: bool = False) -> jax.Array:
  """lhs [M, K], rhs [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N].

  Row r of group g (rows grouped in order by group_sizes [G] int32) gets
  lhs[r] @ rhs[g]; rows past sum(group_sizes) get zeros. metadata: a plan from
  make_plan(group_sizes, M, tiling=, variant=) to share across calls (then
  group_sizes is not read again and may be None). Differentiable in lhs and rhs.
  variant="mgpu" runs JAX's Mosaic-GPU Hopper kernels under the same VJP
  (grouped_matmul_mgpu.py; H100/H200 only, no plan, no interpret mode)."""
  if variant == "mgpu":
    if metadata is not None:
      group_sizes = jnp.diff(metadata.forward.offsets)
    return grouped_matmul_mgpu(lhs, rhs, jnp.asarray(group_sizes, jnp.int32), transpose_rhs,
                               preferred_element_type)
  variant, interpret = platform.resolve(variant, interpret)
  if lhs.ndim != 2 or rhs.ndim != 3:
    raise ValueError(f"Expected lhs [M, K] and rhs [G, K, N]; got {lhs.shape} and {rhs.shape}.")
  num_rows, k_dim = lhs.shape
  num_groups = rhs.shape[0]
  rhs_k, n_dim = (rhs.shape[2], rhs.shape[1]) if transpose_rhs else rhs.shape[1:]
  if rhs_k != k_dim:
    raise ValueError(f"lhs {lhs.shape} and rhs {rhs.shape} disagree on K"
                     f"{' (rhs is [G, N, K] with transpose_rhs)' if transpose_rhs else ''}; "
                     "pass matching shapes.")
  if (metadata is None or group_sizes is not None) and jnp.shape(group_sizes) != (num_groups,):
    raise ValueError(f"group_sizes has shape {jnp.shape(group_sizes)}; pass one size per group "
                     f"of rhs, shape ({num_groups},).")
  if metadata is None:
    metadata = make_plan(group_sizes, num_rows, tiling=tiling, variant=variant)
  row_tile = metadata.row_tile
  if metadata.num_groups != num_groups:
    raise ValueError(f"The plan is for {metadata.num_groups} groups but rhs has {num_groups}; "
                     "build the plan from this op's group_sizes.")
  if tiling is not None and tiling[0] != row_tile:
    raise ValueError(f"tiling tm={tiling[0]} differs from the plan's row tile {row_tile}; "
                     "build the plan with the same tiling.")
  if metadata.num_rows != platform.round_up(num_rows, row_tile):
    raise ValueError(f"The plan covers {metadata.num_rows} rows, not {num_rows} padded to "
                     f"tm={row_tile}; build the plan for this lhs.")
  _check_row_tile(variant, row_tile, interpret)
  preferred = tiling if tiling is not None else DEFAULT_TILING[variant]
  tk, k_pad = _fit_dim(variant, k_dim, preferred[1], interpret)
  tn, n_pad = _fit_dim(variant, n_dim, preferred[2], interpret)

  dtype = jnp.result_type(lhs.dtype, rhs.dtype)
  out_dtype = jnp.dtype(preferred_element_type or dtype)
  lhs = jnp.pad(lhs.astype(dtype), ((0, metadata.num_rows - num_rows), (0, k_pad - k_dim)))
  rhs_pad = ((0, n_pad - n_dim), (0, k_pad - k_dim)) if transpose_rhs else (
      (0, k_pad - k_dim), (0, n_pad - n_dim))
  rhs = jnp.pad(rhs.astype(dtype), ((0, 0), *rhs_pad))
  config = _Config(variant, bool(interpret), (row_tile, tk, tn), transpose_rhs, out_dtype)
  out = _grouped_matmul(lhs, rhs, metadata, config)
  return out[:num_rows, :n_dim]


def ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
               preferred_element_type=None, **options) -> jax.Array:
  """jax.lax.ragged_dot(lhs, rhs, group_sizes) on the kernels; options go to grouped_matmul."""
  return grouped_matmul(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type,
                        **options)
