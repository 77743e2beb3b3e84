"""Causal self-attention with grouped-query heads (GQA) and rotary embeddings.

num_heads query heads share num_kv_heads key/value heads (groups of
g = num_heads / num_kv_heads). A token attends to earlier tokens of its own
packed document only: mask = causal AND same segment id. Softmax in float32.

Decoding (`decode`) keeps the keys and values of earlier positions in a cache
{"k", "v": [batch, max_len, kv_heads, head_dim]}: the new tokens' keys and values
are written at their positions, and a query attends to every cached key at a
position <= its own. One sequence per row (no packing), all rows at the same
position, so a prefill of P tokens followed by one token per step gives the
logits of the full forward pass.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.params import param
from moejax.model.rotary import apply_rotary
from moejax.sharding import constrain


class Attention(nnx.Module):

  def __init__(self, cfg, rngs: nnx.Rngs, *, depth: int | None = None):
    """cfg: the model config; depth: layers for the output init (default num_layers)."""
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    std, pd = cfg.init_std, jnp.dtype(cfg.param_dtype)
    out_std = std / math.sqrt(2 * (depth or cfg.num_layers))
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
    self.rope_theta = cfg.rope_theta
    self.dtype = jnp.dtype(cfg.compute_dtype)
    self.wq = param(rngs, (d, h, hd), ("embed", "q_heads", "head_dim"), std=std, dtype=pd)
    self.wk = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
    self.wv = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
    self.wo = param(rngs, (h, hd, d), ("q_heads", "head_dim", "embed"), std=out_std, dtype=pd)

  def _project(self, x, positions):
    """Queries [b, s, kv, g, hd] and rotated keys, values [b, s, kv, hd]."""
    dt = self.dtype
    x = x.astype(dt)
    q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(dt))
    k = jnp.einsum("bsd,dhk->bshk", x, self.wk[...].astype(dt))
    v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...].astype(dt))
    q = apply_rotary(q, positions, self.rope_theta)
    k = apply_rotary(k, positions, self.rope_theta)
    b, s = x.shape[:2]
    g = self.num_heads // self.num_kv_heads
    return q.reshape(b, s, self.num_kv_heads, g, self.head_dim), k, v

  def _attend(self, q, k, v, mask):
    """softmax(q k^T / sqrt(hd) where mask) v, then the output projection.
    mask: [b, q, s] bool."""
    dt = self.dtype
    b, s = q.shape[:2]
    scores = jnp.einsum("bqngk,bsnk->bngqs", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(self.head_dim)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bngqs,bsnk->bqngk", probs, v.astype(dt))
    out = out.reshape(b, s, self.num_heads, self.head_dim)
    y = jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(dt))
    return constrain(y, ("batch", "seq", "act_embed"))

  def __call__(self, x, *, positions, segment_ids):
    q, k, v = self._project(x, positions)
    s = x.shape[1]
    causal = jnp.tril(jnp.ones((s, s), dtype=bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return self._attend(q, k, v, causal[None] & same_doc)

  def init_cache(self, batch: int, max_len: int) -> dict:
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

  def decode(self, x, *, positions, cache):
    """x: [b, s] new tokens' inputs at `positions` [b, s] (every row starting at
    the same position) -> (y, cache with their keys and values written)."""
    q, k, v = self._project(x, positions)
    start = positions[0, 0]
    cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype),
                                               (0, start, 0, 0)),
             "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype),
                                               (0, start, 0, 0))}
    key_positions = jnp.arange(cache["k"].shape[1])
    mask = key_positions[None, None, :] <= positions[:, :, None]
    return self._attend(q, cache["k"], cache["v"], mask), cache
