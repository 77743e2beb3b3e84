"""The routed SwiGLU expert FFN on Pallas kernels, with its backward written out.

    y_t = sum_j w_tj SwiGLU_{e_tj}(x_t),   SwiGLU_e(x) = (silu(x Wg_e) * (x Wu_e)) Wd_e

the contract of moejax.moe.dispatch.expert_ffn (an expert id equal to E means "no
expert"; the pair adds nothing). The T*k (token, slot) pairs are sorted by
expert once (one argsort) into rows r = 0..M-1, and the group metadata of that
row grouping is built once and shared by every matmul of the forward and the
backward pass.

fused=True (GPU variant; gather_scatter_matmul.py) never builds the
dispatched [M, d] copy of the tokens or the per-pair [M, d] outputs:

    H, A, U = gather_swiglu(x, Wg, Wu)          rows read x[t_r] directly
    y       = scatter_matmul(H, Wd, scale w_r)  atomically added into y[t_r]

and the backward (custom VJP), with t_r the token of row r and w_r its weight:

    dHu[r] = dy[t_r] Wd^T                       (gather_matmul)
    dw_r   = <dHu[r], H[r]>,  dH = w_r dHu
    dA = dH * U * silu'(A),  dU = dH * silu(A)  (elementwise, f32)
    dWd    = sum_r H[r]^T (w_r dy[t_r])         (gather_tgmm, token side on the right)
    dx[t]  = sum_{r of t} dA Wg^T + dU Wu^T     (scatter_matmul, two terms)
    dWg    = sum_r x[t_r]^T dA,  dWu likewise   (gather_tgmm, token side on the left)

so only [M, f] rows (H, A, U, dHu) exist. A token that lists one expert twice
has its two slots merged first (weights summed), so a token owns at most one
row per expert and the scatter's atomics never add twice to one address from
one program (which JAX's interpret-mode emulation of atomics would drop).

fused=False (always for variant "tpu") permutes with XLA gathers whose own
backward is a gather (pallas_kernels.row_gather: dispatch_rows, gather_pairs) and
runs the three products on grouped_matmul.py, whose custom VJP reuses the same
plan; the elementwise SwiGLU and the weighted combine are left to autodiff.
Fused kernels do not exist for TPU: a data-dependent row gather there is one
DMA per row (see gather_scatter_matmul.py).

Gradients flow to x, combine_weights (the router trains through them) and the
three weight tensors; expert_idx gets none. Weights are used in x.dtype (as
the dispatch backends do) and their gradients come back in their own dtype.
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.row_gather import dispatch_rows, gather_pairs
from pallas_kernels.expert_layout import sort_by_expert
from pallas_kernels import gather_scatter_matmul as gs
from pallas_kernels import platform
from pallas_kernels.group_metadata import GroupMetadata, make_group_metadata
from pallas_kernels.grouped_matmul import default_row_tile, grouped_matmul, make_plan

def merge_repeated_experts(expert_idx: jax.Array, combine_weights: jax.Array,
                           num_experts: int) -> tuple[jax.Array, jax.Array]:
  """A slot naming an expert an earlier slot of its token names gets id E (none),
  and its weight is added to that earlier slot: w1 f(x) + w2 f(x) = (w1 + w2) f(x).

  Differentiable in combine_weights (each slot's gradient is its merged slot's)."""
  k = expert_idx.shape[1]
  if k == 1:
    return expert_idx, combine_weights
  same = expert_idx[:, :, None] == expert_idx[:, None, :]            # [T, k(j), k(i)]
  first = jnp.argmax(same, axis=-1)                                  # first slot i with e_j
  repeat = first < jnp.arange(k)
  merged = jnp.einsum("tj,tji->ti", combine_weights,
                      jax.nn.one_hot(first, k, dtype=combine_weights.dtype))
  return jnp.where(repeat, num_experts, expert_idx), merged


# -------------------------------------------------------------------------- fused (GPU)


class _FusedConfig(NamedTuple):
  num_tokens: int
  tiling: tuple[int, int, int]
  interpret: bool


def _silu_grad(a):
  s = jax.nn.sigmoid(a)
  return s * (1 + a * (1 - s))


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused_ffn(x, row_weight, w_gate, w_up, w_down, row_token, meta, config):
  return _fused_forward(x, row_weight, w_gate, w_up, w_down, row_token, meta, config, False)[0]


def _fused_forward(x, row_weight, w_gate, w_up, w_down, row_token, meta, config, keep):
  run = dict(tiling=config.tiling, interpret=config.interpret)
  pre = gs.gather_swiglu(x, w_gate, w_up, row_token, meta, return_preactivations=keep, **run)
  h = pre[0] if keep else pre
  y = gs.scatter_matmul(h, w_down, row_token, meta, config.num_tokens, row_scale=row_weight,
                        **run)
  return y.astype(x.dtype), pre


def _fused_fwd(x, row_weight, w_gate, w_up, w_down, row_token, meta, config):
  y, (h, a, u) = _fused_forward(x, row_weight, w_gate, w_up, w_down, row_token, meta, config,
                                True)
  return y, (x, row_weight, w_gate, w_up, w_down, row_token, meta, h, a, u)


def _fused_bwd(config, res, dy):
  x, row_weight, w_gate, w_up, w_down, row_token, meta, h, a, u = res
  run = dict(tiling=config.tiling, interpret=config.interpret)
  dy = dy.astype(x.dtype)
  f32 = jnp.float32
  d_hu = gs.gather_matmul(dy, w_down, row_token, meta, transpose_rhs=True, out_dtype=f32, **run)
  d_row_weight = jnp.sum(d_hu * h.astype(f32), axis=-1)
  d_h = d_hu * row_weight.astype(f32)[:, None]
  a, u = a.astype(f32), u.astype(f32)
  d_a = (d_h * u * _silu_grad(a)).astype(x.dtype)
  d_u = (d_h * jax.nn.silu(a)).astype(x.dtype)
  d_down = gs.gather_tgmm(h, dy, row_token, meta, gather="rhs", row_scale=row_weight,
                          out_dtype=w_down.dtype, **run)
  dx = gs.scatter_matmul([d_a, d_u], [w_gate, w_up], row_token, meta, config.num_tokens,
                         transpose_rhs=True, **run)
  d_gate = gs.gather_tgmm(x, d_a, row_token, meta, gather="lhs", out_dtype=w_gate.dtype, **run)
  d_up = gs.gather_tgmm(x, d_u, row_token, meta, gather="lhs", out_dtype=w_up.dtype, **run)
  return (dx.astype(x.dtype), d_row_weight.astype(row_weight.dtype),
          d_gate.astype(w_gate.dtype), d_up.astype(w_up.dtype), d_down.astype(w_down.dtype),
          None, None)


_fused_ffn.defvjp(_fused_fwd, _fused_bwd)


def _moe_ffn_fused(x, expert_idx, combine_weights, w_gate, w_up, w_down, tiling, interpret):
  num_tokens, k = expert_idx.shape
  num_experts = w_gate.shape[0]
  expert_idx, combine_weights = merge_repeated_experts(expert_idx, combine_weights,
                                                       num_experts)
  tiling = tuple(tiling) if tiling is not None else (
      default_row_tile("gpu", num_tokens * k), *gs.DEFAULT_TILING[1:])
  num_rows = platform.round_up(num_tokens * k, tiling[0])
  routing = sort_by_expert(expert_idx, num_experts, num_rows)
  meta: GroupMetadata = make_group_metadata(routing.sizes, num_rows, tiling[0])
  row_token = routing.row_pair // k                       # pair P -> token T (none)
  row_weight = gather_pairs(combine_weights.reshape(-1).astype(jnp.float32),
                            routing.row_pair, routing.pair_row)
  config = _FusedConfig(num_tokens, tiling, interpret)
  return _fused_ffn(x, row_weight, w_gate, w_up, w_down, row_token, meta, config)


# ------------------------------------------------------------------- unfused (GPU, TPU)


def _moe_ffn_unfused(x, expert_idx, combine_weights, w_gate, w_up, w_down, variant, tiling,
                     interpret):
  num_tokens, k = expert_idx.shape
  num_pairs = num_tokens * k
  routing = sort_by_expert(expert_idx, w_gate.shape[0], num_pairs)
  plan = make_plan(routing.sizes, num_pairs, tiling=tiling, variant=variant)
  mm = partial(grouped_matmul, group_sizes=None, metadata=plan, tiling=tiling, variant=variant,
               interpret=interpret)
  dt = x.dtype
  rows = dispatch_rows(x, routing.row_pair, routing.pair_row, k)           # [P, d]
  a = mm(rows, w_gate.astype(dt))
  u = mm(rows, w_up.astype(dt))
  out_rows = mm(jax.nn.silu(a) * u, w_down.astype(dt))
  out = gather_pairs(out_rows, routing.pair_row, routing.row_pair).reshape(num_tokens, k, -1)
  y = jnp.einsum("tk,tkd->td", combine_weights.astype(jnp.float32), out,
                 preferred_element_type=jnp.float32)
  return y.astype(dt)


# ------------------------------------------------------------------------------- entry


def moe_ffn(x, expert_idx, combine_weights, w_gate, w_up, w_down, *, fused: bool | None = None,
            variant: str | None = None, interpret: bool | None = None, tiling=None):
  """y [T, d] in x.dtype: y_t = sum_j w_tj SwiGLU_{e_tj}(x_t).

  x [T, d]; expert_idx [T, k] int (E = no expert); combine_weights [T, k];
  w_gate, w_up [E, d, f]; w_down [E, f, d]. fused: gather/scatter kernels
  (default on the gpu variant; not available for "tpu"). tiling: (tm, tk, tn),
  tm the row tile of the sorted rows, tk and tn preferred column tiles."""
  variant, interpret = platform.resolve(variant, interpret)
  if fused is None:
    fused = variant == "gpu" and (interpret or (w_gate.shape[1] % 16 == 0
                                                and w_gate.shape[2] % 16 == 0))
  if fused and variant == "tpu":
    raise ValueError("The fused gather/scatter kernels have no TPU variant (per-row gathers "
                     "need per-row DMAs); pass fused=False for variant 'tpu'.")
  if x.ndim != 2 or expert_idx.ndim != 2 or combine_weights.shape != expert_idx.shape:
    raise ValueError(f"Expected x [T, d], expert_idx [T, k] and combine_weights [T, k]; got "
                     f"{x.shape}, {expert_idx.shape} and {combine_weights.shape}.")
  num_experts, d, f = w_gate.shape
  if (w_up.shape != w_gate.shape or w_down.shape != (num_experts, f, d) or x.shape[1] != d
      or expert_idx.shape[0] != x.shape[0]):
    raise ValueError(f"Shapes do not chain: x {x.shape}, expert_idx {expert_idx.shape}, w_gate "
                     f"{w_gate.shape}, w_up {w_up.shape}, w_down {w_down.shape}; need w_gate, "
                     "w_up [E, d, f] and w_down [E, f, d].")
  if fused and not interpret and (d % 16 or f % 16):
    raise ValueError(f"The fused GPU kernels need d and f to be multiples of 16 (Triton blocks), "
                     f"got d={d}, f={f}; pass fused=False (the unfused path pads).")
  if fused:
    return _moe_ffn_fused(x, expert_idx, combine_weights, w_gate, w_up, w_down, tiling,
                          interpret)
  return _moe_ffn_unfused(x, expert_idx, combine_weights, w_gate, w_up, w_down, variant, tiling,
                          interpret)
