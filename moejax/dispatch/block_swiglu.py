"""SwiGLU experts applied block by block to expert-sorted rows (the grouped matmul).

Rows arrive sorted by expert and each expert's group padded to a multiple of
`block_size` (see layout.py), so every block of rows belongs to one expert:

    [a | u] = x[b] [W_gate[e_b] | W_up[e_b]]
    y[b]    = (SiLU(a) * u) W_down[e_b]

The blocks are visited by a loop whose trip count is the number of blocks in use
(dynamic), so compute follows the routed tokens, not the worst-case buffer. On
XLA:CPU a loop of plain dots runs at nearly the speed of one large dot, whereas
a batched dot over blocks is 2x slower and gathering W[e_b] for every block
costs a third of the matmul time (numbers in docs/design.md). Gate and up
weights are concatenated once per call so each block does one wider matmul.

The backward pass is written out (custom VJP). The forward keeps the [rows, 2f]
pre-activations (as autodiff of a dense SwiGLU would), and the backward adds
each block's weight gradient into its expert's slice in place, so no
[blocks, d, f] tensor is built and no weight is copied per block.
"""

from functools import partial

import jax
import jax.numpy as jnp


def _silu_grad(a):
  s = jax.nn.sigmoid(a)
  return s * (1 + a * (1 - s))


def _block(x, i, size):
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=0)


def _put(buf, value, i, size):
  return jax.lax.dynamic_update_slice_in_dim(buf, value.astype(buf.dtype), i * size, 0)


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def block_swiglu(x, w_gate, w_up, w_down, block_expert, num_blocks, block_size):
  """x: [blocks * block_size, d] sorted, padded rows; w_gate, w_up: [E, d, f];
  w_down: [E, f, d]; block_expert: [blocks] int; num_blocks: int scalar (blocks in
  use, a prefix). Returns [blocks * block_size, d]; rows of unused blocks are 0."""
  return _forward(x, w_gate, w_up, w_down, block_expert, num_blocks, block_size)[0]


def _forward(x, w_gate, w_up, w_down, block_expert, num_blocks, block_size):
  """y and the pre-activations [x W_gate | x W_up] of every row."""
  dt = x.dtype
  f = w_gate.shape[-1]
  w_in = jnp.concatenate([w_gate, w_up], axis=-1).astype(dt)  # [E, d, 2f]
  wd = w_down.astype(dt)

  def body(i, carry):
    y, pre = carry
    e = block_expert[i]
    au = _block(x, i, block_size) @ w_in[e]
    h = jax.nn.silu(au[:, :f]) * au[:, f:]
    return _put(y, h @ wd[e], i, block_size), _put(pre, au, i, block_size)

  init = (jnp.zeros_like(x), jnp.zeros((x.shape[0], 2 * f), dt))
  return jax.lax.fori_loop(0, num_blocks, body, init)


def _fwd(x, w_gate, w_up, w_down, block_expert, num_blocks, block_size):
  y, pre = _forward(x, w_gate, w_up, w_down, block_expert, num_blocks, block_size)
  return y, (x, pre, w_gate, w_up, w_down, block_expert, num_blocks)


def _bwd(block_size, res, dy):
  x, pre, w_gate, w_up, w_down, block_expert, num_blocks = res
  dt = x.dtype
  f = w_gate.shape[-1]
  acc = jnp.promote_types(w_gate.dtype, jnp.float32)
  w_in = jnp.concatenate([w_gate, w_up], axis=-1).astype(dt)
  wd = w_down.astype(dt)

  def body(i, carry):
    dx, dw_in, dwd = carry
    e = block_expert[i]
    xb, dyb = _block(x, i, block_size), _block(dy, i, block_size).astype(dt)
    au = _block(pre, i, block_size)
    a, u = au[:, :f], au[:, f:]
    sa = jax.nn.silu(a)
    dh = dyb @ wd[e].T
    dau = jnp.concatenate([dh * u * _silu_grad(a), dh * sa], axis=-1)
    dwd = dwd.at[e].add(((sa * u).T @ dyb).astype(acc))
    dw_in = dw_in.at[e].add((xb.T @ dau).astype(acc))
    return _put(dx, dau @ w_in[e].T, i, block_size), dw_in, dwd

  init = (jnp.zeros_like(x), jnp.zeros(w_in.shape, acc), jnp.zeros(w_down.shape, acc))
  dx, dw_in, dwd = jax.lax.fori_loop(0, num_blocks, body, init)
  return (dx, dw_in[..., :f].astype(w_gate.dtype), dw_in[..., f:].astype(w_up.dtype),
          dwd.astype(w_down.dtype), None, None)


block_swiglu.defvjp(_fwd, _bwd)
