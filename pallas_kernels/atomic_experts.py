"""Atomic (single-neuron) experts as an expert-centric kernel, forward and backward.

    y_t = sum_{j<k} g_tj act(s_tj) v_e,   s_tj = u_e . x_t,   e = idx_tj,   U, V: [N, d]

The T*k (token, slot) pairs are sorted by expert (XLA argsort, as
pallas_kernels.atomic_experts_reference.atomic_expert_sorted does), so the pairs of one
expert form a run. One program walks a tile of `block_pairs` sorted pairs in
order, one pair per step with d-wide vector ops:

  forward   load u_e, v_e only when the expert changes (once per run and tile),
            gather the token row x_t, s = x_t . u_e, then
            y_t += g act(s) v_e                   (atomic add, float32 output)
  backward  with dy_t gathered the same way and r = v_e . dy_t:
            dg = act(s) r,  ds = act'(s) g r
            dx_t += ds u_e                         (atomic add)
            dU_e += ds x_t,  dV_e += g act(s) dy_t (summed in registers over the
                                                    run, one atomic add per run
                                                    and tile)
            dg goes to the pair's sorted slot (plain store) and back to [T, k]
            through the inverse permutation (XLA).

Why one pair per step instead of a [pairs, d] tile: an atomic expert is one
row, so there is no matmul to feed, and a tile's token rows may repeat (a
token whose two experts are neighbours in the sorted order), which a single
vector atomic add cannot express in Pallas interpret mode (it applies a
repeated address once). Row-at-a-time atomic adds are exact everywhere, and
the run structure gives the expert-side reuse for free. Pairs whose expert is
>= N ("no expert": expert parallelism marks foreign pairs so) sort to the end
and are never visited; a tile past the last real pair does nothing. Token-side
sums use float32 atomics, so on a GPU their order (and last bits) can vary from
run to run.

Variants: "gpu" is the kernel above in the Triton dialect (whole-array refs,
scalar loads of the sorted metadata, masked reloads, pltriton.atomic_add).
"tpu" runs the XLA expert-sorted path instead: on Mosaic every pair needs its
own row DMAs from HBM (token row, expert rows, output row), and a token's
output row is revisited out of order, which BlockSpec pipelining cannot
accumulate; a per-pair DMA loop would be slower than XLA's gathers.
d is padded to a power of two for Triton (a copy of x and the tables when it
is not one already).

Inside jax.shard_map (moejax/papers/omnimoe/parallel.py) the outputs are declared varying
over the inputs' manual axes, as check_vma asks. Interpret mode there needs
check_vma=False: JAX's HLO interpreter indexes the (varying) refs with the
(unvarying) program id and refuses the mix.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import platform
from pallas_kernels.atomic_experts_reference import atomic_expert_sorted

ACTIVATIONS = ("silu", "gelu")
_GELU_C = math.sqrt(2.0 / math.pi)


def _act_and_grad(activation: str, s):
  """(act(s), act'(s)) for float32 s; "gelu" is jax.nn.gelu's tanh form."""
  if activation == "silu":
    sig = 1.0 / (1.0 + jnp.exp(-s))
    return s * sig, sig * (1.0 + s * (1.0 - sig))
  th = jnp.tanh(_GELU_C * (s + 0.044715 * s * s * s))
  grad = 0.5 * (1.0 + th) + 0.5 * s * (1.0 - th * th) * _GELU_C * (1.0 + 3 * 0.044715 * s * s)
  return 0.5 * s * (1.0 + th), grad


def _sort_pairs(expert_idx, gates, num_experts: int, block_pairs: int) -> dict:
  """The pairs sorted by expert (ids outside [0, N) become N and sort last),
  padded to whole tiles with "no expert" pairs."""
  num_pairs = expert_idx.size
  k = expert_idx.shape[1]
  flat = expert_idx.reshape(-1).astype(jnp.int32)
  flat = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)        # sorted slot -> pair
  pad = pl.cdiv(num_pairs, block_pairs) * block_pairs - num_pairs
  return {
      "experts": jnp.pad(flat[order], (0, pad), constant_values=num_experts),
      "tokens": jnp.pad(order // k, (0, pad)),
      "gates": jnp.pad(gates.reshape(-1)[order].astype(jnp.float32), (0, pad)),
      "order": order,
      "num_valid": jnp.sum(flat < num_experts, dtype=jnp.int32).reshape(1),
  }


def _tile_count(num_valid_ref, block_pairs: int):
  """(first sorted slot of this program's tile, real pairs in it)."""
  base = pl.program_id(0) * block_pairs
  return base, jnp.clip(num_valid_ref[0] - base, 0, block_pairs)


def _expert_rows(up_ref, down_ref, e, fresh, u, v):
  """u_e, v_e, read from memory only when the expert changed."""
  mask = jnp.broadcast_to(fresh, u.shape)
  return (pltriton.load(up_ref.at[e], mask=mask, other=u),
          pltriton.load(down_ref.at[e], mask=mask, other=v))


def _forward_kernel(num_valid_ref, experts_ref, tokens_ref, gates_ref, x_ref, up_ref,
                    down_ref, y_init_ref, y_ref, *, block_pairs: int, activation: str):
  del y_init_ref  # aliased to y_ref: the zeros the atomic adds start from
  base, count = _tile_count(num_valid_ref, block_pairs)
  width = x_ref.shape[1]
  compute = x_ref.dtype

  def step(p, carry):
    prev, u, v = carry
    e, t, g = experts_ref[base + p], tokens_ref[base + p], gates_ref[base + p]
    u, v = _expert_rows(up_ref, down_ref, e, e != prev, u, v)
    x = x_ref[t, :].astype(jnp.float32)
    s = jnp.sum(x * u.astype(compute).astype(jnp.float32))
    h, _ = _act_and_grad(activation, s)
    pltriton.atomic_add(y_ref, (t, pl.ds(0, width)),
                        (g * h) * v.astype(compute).astype(jnp.float32))
    return e, u, v

  init = (jnp.int32(-1), jnp.zeros((width,), up_ref.dtype), jnp.zeros((width,), down_ref.dtype))
  jax.lax.fori_loop(0, count, step, init)


def _backward_kernel(num_valid_ref, experts_ref, tokens_ref, gates_ref, x_ref, up_ref,
                     down_ref, dy_ref, dx_init_ref, du_init_ref, dv_init_ref,
                     dx_ref, du_ref, dv_ref, dg_ref, *, block_pairs: int, activation: str):
  del dx_init_ref, du_init_ref, dv_init_ref  # aliased zeros under the atomic adds
  base, count = _tile_count(num_valid_ref, block_pairs)
  width = x_ref.shape[1]
  compute = x_ref.dtype
  slot = jax.lax.broadcasted_iota(jnp.int32, (block_pairs,), 0)

  def flush(e, du_run, dv_run):
    pltriton.atomic_add(du_ref, (e, pl.ds(0, width)), du_run)
    pltriton.atomic_add(dv_ref, (e, pl.ds(0, width)), dv_run)

  def step(p, carry):
    prev, u, v, du_run, dv_run, dg = carry
    e, t, g = experts_ref[base + p], tokens_ref[base + p], gates_ref[base + p]
    fresh = e != prev

    @pl.when(fresh & (prev >= 0))
    def _():
      flush(prev, du_run, dv_run)

    du_run = jnp.where(fresh, 0.0, du_run)
    dv_run = jnp.where(fresh, 0.0, dv_run)
    u, v = _expert_rows(up_ref, down_ref, e, fresh, u, v)
    uf = u.astype(compute).astype(jnp.float32)
    vf = v.astype(compute).astype(jnp.float32)
    x = x_ref[t, :].astype(jnp.float32)
    dy = dy_ref[t, :].astype(jnp.float32)
    h, dh = _act_and_grad(activation, jnp.sum(x * uf))
    r = jnp.sum(vf * dy)
    ds = dh * g * r
    pltriton.atomic_add(dx_ref, (t, pl.ds(0, width)), ds * uf)
    return (e, u, v, du_run + ds * x, dv_run + (g * h) * dy,
            jnp.where(slot == p, h * r, dg))

  zeros = jnp.zeros((width,), jnp.float32)
  init = (jnp.int32(-1), jnp.zeros((width,), up_ref.dtype), jnp.zeros((width,), down_ref.dtype),
          zeros, zeros, jnp.zeros((block_pairs,), jnp.float32))
  last, _, _, du_run, dv_run, dg = jax.lax.fori_loop(0, count, step, init)

  @pl.when(count > 0)
  def _():
    flush(last, du_run, dv_run)

  dg_ref[pl.ds(base, block_pairs)] = dg


def _struct(shape, dtype, *like):
  """ShapeDtypeStruct that varies over the shard_map axes the arrays in `like` vary
  over (pallas_call needs it under check_vma; the field's name is jax's, read as
  the aval spells it: manual_axis_type, or vma before it was renamed)."""
  union = sum(jnp.zeros_like(a, dtype=jnp.float32, shape=()) for a in like)
  aval = jax.typeof(union)
  for field in ("manual_axis_type", "vma"):
    if getattr(aval, field, None) is not None:
      return jax.ShapeDtypeStruct(shape, dtype, **{field: getattr(aval, field)})
  return jax.ShapeDtypeStruct(shape, dtype)


def _vary_like(out, like):
  """out with the shard_map varying axes of `like` (a cotangent must carry its
  primal's type; the backward's pallas_call may not be traced under check_vma)."""
  return out + jnp.zeros_like(like, dtype=out.dtype, shape=())


def _padded(a, width: int):
  return a if a.shape[-1] == width else jnp.pad(a, ((0, 0), (0, width - a.shape[-1])))


def _call(kernel, args, out_shapes, aliases, interpret: bool, block_pairs: int):
  grid = args[1].shape[0] // block_pairs   # args[1]: the padded sorted experts
  return pl.pallas_call(
      kernel, grid=(grid,), out_shape=out_shapes, input_output_aliases=aliases,
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret)(*args)


def _forward(x, expert_idx, gates, up, down, activation, out_dtype, interpret, block_pairs):
  width = platform.next_power_of_two(x.shape[1])
  pairs = _sort_pairs(expert_idx, gates, up.shape[0], block_pairs)
  xp, upp, downp = _padded(x, width), _padded(up, width), _padded(down, width)
  y0 = jnp.zeros((x.shape[0], width), jnp.float32)
  args = (pairs["num_valid"], pairs["experts"], pairs["tokens"], pairs["gates"], xp, upp, downp,
          y0)
  kernel = functools.partial(_forward_kernel, block_pairs=block_pairs, activation=activation)
  y = _call(kernel, args, _struct(y0.shape, jnp.float32, *args), {7: 0}, interpret,
            block_pairs)
  y = y[:, :x.shape[1]].astype(out_dtype or x.dtype)
  return y, (pairs, xp, upp, downp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _atomic(x, expert_idx, gates, up, down, activation, out_dtype, interpret, block_pairs):
  return _forward(x, expert_idx, gates, up, down, activation, out_dtype, interpret,
                  block_pairs)[0]


def _atomic_fwd(x, expert_idx, gates, up, down, activation, out_dtype, interpret, block_pairs):
  y, residuals = _forward(x, expert_idx, gates, up, down, activation, out_dtype, interpret,
                          block_pairs)
  # Empty arrays carry the inputs' dtypes (and shard_map varying axes) to the backward.
  dtypes = tuple(jnp.zeros_like(a, shape=(0,)) for a in (x, gates, up, down))
  return y, (residuals, dtypes)


def _atomic_bwd(activation, out_dtype, interpret, block_pairs, residuals, dy):
  del out_dtype
  (pairs, xp, upp, downp), (x_dt, g_dt, up_dt, down_dt) = residuals
  num_tokens, width = xp.shape
  d = dy.shape[1]
  dyp = _padded(dy, width)
  zeros_rows = jnp.zeros((num_tokens, width), jnp.float32)
  zeros_table = jnp.zeros(upp.shape, jnp.float32)
  args = (pairs["num_valid"], pairs["experts"], pairs["tokens"], pairs["gates"], xp, upp, downp,
          dyp, zeros_rows, zeros_table, zeros_table)
  kernel = functools.partial(_backward_kernel, block_pairs=block_pairs, activation=activation)
  outs = tuple(_struct(shape, jnp.float32, *args) for shape in (
      zeros_rows.shape, zeros_table.shape, zeros_table.shape, pairs["experts"].shape))
  dx, du, dv, dg_sorted = _call(kernel, args, outs, {8: 0, 9: 1, 10: 2}, interpret, block_pairs)
  order = pairs["order"]
  num_pairs = order.shape[0]
  dg = jnp.zeros((num_pairs,), jnp.float32).at[order].set(dg_sorted[:num_pairs],
                                                           unique_indices=True)
  k = num_pairs // num_tokens
  return (_vary_like(dx[:, :d].astype(x_dt.dtype), x_dt), None,
          _vary_like(dg.reshape(num_tokens, k).astype(g_dt.dtype), g_dt),
          _vary_like(du[:, :d].astype(up_dt.dtype), up_dt),
          _vary_like(dv[:, :d].astype(down_dt.dtype), down_dt))


_atomic.defvjp(_atomic_fwd, _atomic_bwd)


def atomic_pallas(x, expert_idx, gates, up, down, *, activation: str = "silu", out_dtype=None,
                  variant: str | None = None, interpret: bool | None = None,
                  block_pairs: int = 64):
  """x: [T, d]; expert_idx, gates: [T, k]; up, down: [N, d] -> y [T, d] (summed in
  float32, returned in out_dtype, default x.dtype); ids >= N contribute nothing.

  The contract of pallas_kernels.atomic_experts_reference.atomic_gather. block_pairs: sorted
  pairs per program (rounded up to a power of two)."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {activation!r}; choose one of {ACTIVATIONS}.")
  if x.ndim != 2 or expert_idx.shape != gates.shape or up.shape != down.shape or \
      up.shape[1:] != x.shape[1:] or expert_idx.shape[0] != x.shape[0]:
    raise ValueError(f"Expected x [T, d], expert_idx and gates [T, k], up and down [N, d]; got "
                     f"{x.shape}, {expert_idx.shape}, {gates.shape}, {up.shape}, {down.shape}.")
  variant, interpret = platform.resolve(variant, interpret)
  if variant == "tpu":
    # No Mosaic body (module docstring): the XLA expert-sorted path.
    return atomic_expert_sorted(x, expert_idx, gates, up, down, activation=activation,
                                out_dtype=out_dtype)
  return _atomic(x, expert_idx.astype(jnp.int32), gates, up, down, activation, out_dtype,
                 interpret, platform.next_power_of_two(block_pairs))
