"""L3, a large lookup layer (Tseng & De Sa, arXiv 2601.21461): a sublayer between blocks.

For a position with hidden state x and input token id t (l3_lookup.py does the read):

    h = RMSNorm(x)
    a = sum_j softmax(K_t h)_j V_t[j]        K_t, V_t: the rows token id t owns
    y = W_mix [LN(W_up a) ; h]               LN: LayerNorm with scale and bias

and the caller adds y to the residual stream (x <- x + y). Routing is static
(by token id), so there is no router and no auxiliary loss.

W_mix starts at zero, all of it, so a new L3 layer is the identity on the
residual stream (y = 0): zeroing only the read-side columns would still add
W_mix[h-side] h. At that start only W_mix gets a gradient (every other
parameter is behind it); the tables begin to learn from the second step.

The CSR index (offsets and counts per token id, int32 [vocab]) is an L3Index
variable: model state, not a parameter, so it is saved with checkpoints,
replicated, and can be swapped for another allocation. Tables are split by rows
over the `expert` mesh axis (moejax/papers/l3/parallel.py) when that axis is larger than one.

Choices where the sources are silent: the layer is pre-norm like every other
sublayer (it reads and concatenates h = RMSNorm(x), not the raw residual x);
scores are not scaled unless l3.scale_scores; the tables are decayed by AdamW
like the token embedding. With model.param_dtype=bfloat16 the padded path's
table gradients are scatter-added in bfloat16 (thousands of addends per row for
a frequent id): keep L3 runs in float32 params.

aux metrics (no losses): l3_entropy/after_NN (mean softmax entropy over tokens,
nats) and l3_entropy_norm/after_NN (mean of H / log(count) over tokens whose id
owns more than one row: 1 = uniform, 0 = one-hot).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import sharding
from moejax.errors import ConfigError
from moejax.papers.l3.parallel import l3_lookup_parallel
from moejax.papers.l3.lookup import lookup, offsets_from_counts
from moejax.model.norm import RMSNorm
from moejax.model.params import ones_param, param, zeros_param
from moejax.sharding import LOGICAL_AXES_KEY


class L3Index(nnx.Variable):
  """Per-token-id CSR index of an L3 table, int32 [vocab] (state, not a Param)."""


class LayerNorm(nnx.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = ones_param((dim,), (None,), param_dtype)
    self.bias = zeros_param((dim,), (None,), param_dtype)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32)
            + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def check_counts(counts, rows: int, max_rows: int) -> np.ndarray:
  """counts as an int array, after checking sum = rows and 1 <= each <= max_rows."""
  counts = np.asarray(counts)
  if counts.ndim != 1 or counts.size == 0 or not np.issubdtype(counts.dtype, np.integer):
    raise ConfigError(f"L3 counts must be a non-empty 1-D integer sequence, got shape "
                      f"{counts.shape} of {counts.dtype}.")
  if int(counts.sum()) != rows:
    raise ConfigError(f"L3 counts sum to {int(counts.sum())} rows, but l3.rows = {rows}.")
  if counts.min() < 1 or counts.max() > max_rows:
    raise ConfigError(f"L3 counts must lie in [1, l3.max_rows_per_token = {max_rows}], "
                      f"got [{counts.min()}, {counts.max()}].")
  return counts


def l3_read(h, ids, keys, values, offsets, counts, *, max_rows, path, scale):
  """The lookup, through row-split tables when the mesh has an expert axis."""
  mesh = sharding.active_mesh()
  if mesh is not None and mesh.shape["expert"] > 1:
    return l3_lookup_parallel(h, ids, keys, values, offsets, counts, max_rows=max_rows,
                              path=path, scale=scale, mesh=mesh)
  return lookup(h, ids, keys, values, offsets, counts, max_rows=max_rows, path=path,
                scale=scale)


class L3Layer(nnx.Module):

  def __init__(self, cfg, position: int, counts, rngs: nnx.Rngs):
    m, c = cfg.model, cfg.l3
    pd = jnp.dtype(m.param_dtype)
    d = m.d_model
    counts = check_counts(counts, c.rows, c.max_rows_per_token)
    emb_dim = d if c.tie_kv else c.emb_dim
    if c.tie_kv and c.emb_dim != d:
      raise ConfigError(f"l3.tie_kv uses the keys as values, so l3.emb_dim must equal "
                        f"model.d_model = {d}, got {c.emb_dim}.")
    self.position = position
    self.dtype = jnp.dtype(m.compute_dtype)
    self.max_rows, self.path = c.max_rows_per_token, c.path
    self.scale = 1.0 / math.sqrt(d) if c.scale_scores else 1.0
    self.tie_kv = c.tie_kv
    index_axes = {LOGICAL_AXES_KEY: (None,)}
    self.offsets = L3Index(offsets_from_counts(counts), **index_axes)
    self.counts = L3Index(jnp.asarray(counts, jnp.int32), **index_axes)
    self.norm = RMSNorm(d, eps=m.norm_eps, param_dtype=pd)
    self.keys = param(rngs, (c.rows, d), ("l3_rows", None), std=c.init_std, dtype=pd)
    self.values = nnx.data(None if c.tie_kv else param(
        rngs, (c.rows, emb_dim), ("l3_rows", None), std=c.init_std, dtype=pd))
    self.w_up = param(rngs, (emb_dim, c.up_dim), (None, None), std=m.init_std, dtype=pd)
    self.up_norm = LayerNorm(c.up_dim, eps=m.norm_eps, param_dtype=pd)
    self.w_mix = zeros_param((c.up_dim + d, d), (None, "embed"), pd)

  def __call__(self, x, *, token_ids, loop_index=None, step=None, train=False):
    del loop_index, step, train
    batch, seq, d = x.shape
    dt = self.dtype
    h = self.norm(x.astype(dt))
    keys = self.keys[...]
    values = keys if self.tie_kv else self.values[...]
    read, entropy = l3_read(h.reshape(batch * seq, d), token_ids.reshape(batch * seq),
                            keys, values, self.offsets[...], self.counts[...],
                            max_rows=self.max_rows, path=self.path, scale=self.scale)
    up = self.up_norm(read.astype(dt) @ self.w_up[...].astype(dt))
    y = jnp.concatenate([up.reshape(batch, seq, -1), h], axis=-1) @ self.w_mix[...].astype(dt)
    return y, self._metrics(entropy, self.counts[...][token_ids.reshape(-1)])

  def _metrics(self, entropy, count):
    multi = count > 1
    norm = jnp.where(multi, entropy / jnp.log(jnp.maximum(count, 2).astype(jnp.float32)), 0.0)
    tag = f"after_{self.position:02d}"
    return {f"l3_entropy/{tag}": jnp.mean(entropy),
            f"l3_entropy_norm/{tag}": jnp.sum(norm) / jnp.maximum(jnp.sum(multi), 1)}
