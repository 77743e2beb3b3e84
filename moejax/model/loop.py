"""A looped segment: one stack of decoder layers applied R times with shared weights.

    h_0 = output of the prefix layers
    h_{k+1} = Block(h_k; k)      k = 0 .. R-1, the same weights every time
    suffix layers read h_R

The iterations run under `jax.lax.scan` (one compiled body whatever R is; with
loop.remat each iteration's activations are recomputed in the backward pass,
so activation memory is that of one iteration plus the R carried states).
Nothing is re-injected between iterations (LoopMoE does not add the prelude
state back each time: docs/papers/loopmoe.md §a). Model state that the forward pass updates
(router biases, BatchNorm statistics) is carried from one iteration to the next,
so iteration k+1 sees the bias iteration k left. Note the asymmetry this makes
with a Vanilla MoE under aux-loss-free balancing (moe.bias_update_rate > 0): a
looped layer's bias moves R times per step, and in training later iterations
route with a bias already nudged on the same batch. The loopmoe presets use a
balance loss and no bias updates, so they are not affected.

Diagnostics (aux, never losses):
  loop/cos_consecutive   [R] mean over tokens of cos(h_{k+1}, h_k)
  loop/cos_first, loop/cos_last   its first and last entries (progress line)
  loop/<metric>          [R] every scalar metric of the block, per iteration
  <metric>               its mean over iterations
  expert_load/.../iter_k the per-expert load of each iteration, and the pooled
                         load over all iterations under the layer's usual key
  loop/pooled_load_entropy  normalised entropy of the load pooled over iterations
                         (beside load_entropy, the mean of the per-iteration ones)
Auxiliary losses ("loss/*") are computed per iteration and summed, as for
layers: each iteration's tokens are balanced on their own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model import load_balance as lb


def _cosine(a, b) -> jax.Array:
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  num = jnp.sum(a32 * b32, axis=-1)
  den = jnp.sqrt(jnp.sum(a32 * a32, axis=-1) * jnp.sum(b32 * b32, axis=-1))
  return jnp.mean(num / jnp.maximum(den, 1e-12))


def per_iteration_aux(stacked: dict, iterations: int) -> dict:
  """Reduces {key: [R, ...]} from the scan to the aux entries listed above."""
  out, pooled_entropies = {}, []
  for key, value in stacked.items():
    if key.startswith("loss/"):
      out[key] = jnp.sum(value, axis=0)
      out[f"loop/{key[5:]}_loss"] = value  # each iteration's term, logged only
    elif key.startswith("expert_load/"):
      pooled = jnp.mean(value, axis=0)
      out[key] = pooled
      pooled_entropies.append(lb.health_metrics(pooled, jnp.float32(0))["load_entropy"])
      for k in range(iterations):
        out[f"{key}/iter_{k}"] = value[k]
    elif value.ndim == 1:
      out[key] = jnp.mean(value)
      out[f"loop/{key}"] = value
    else:
      out[key] = jnp.mean(value, axis=0)
  if pooled_entropies:  # mean over the looped layers
    out["loop/pooled_load_entropy"] = sum(pooled_entropies) / len(pooled_entropies)
  return out


def run_loop(blocks, x, *, iterations: int, remat: bool, combine_aux, **call_kwargs):
  """Applies `blocks` (a list of Block) `iterations` times to x with shared weights.

  Returns (x, aux): one aux dict for the whole looped block (see the module
  docstring). call_kwargs go to every Block call (positions, segment_ids,
  token_ids, step, train); loop_index is the iteration number."""
  stack = nnx.List(list(blocks))
  graphdef, params, rest = nnx.split(stack, nnx.Param, ...)

  def body(carry, k):
    h, state = carry
    layers = nnx.merge(graphdef, params, state)
    per_layer = []
    h_next = h
    for block in layers:
      h_next, aux = block(h_next, loop_index=k, **call_kwargs)
      per_layer.append(aux)
    aux = combine_aux(per_layer)
    aux["cos_consecutive"] = _cosine(h_next, h)
    return (h_next, nnx.state(layers, nnx.Not(nnx.Param))), aux

  if remat:
    body = jax.checkpoint(body, prevent_cse=False)  # scan already keeps CSE apart
  (x, rest), stacked = jax.lax.scan(body, (x, rest), jnp.arange(iterations))
  nnx.update(stack, rest)
  cos = stacked.pop("cos_consecutive")
  aux = per_iteration_aux(stacked, iterations)
  aux["loop/cos_consecutive"] = cos
  aux["loop/cos_first"], aux["loop/cos_last"] = cos[0], cos[-1]
  return x, aux


def decode_loop(blocks, x, caches, *, iterations: int, **call_kwargs):
  """The looped segment in evaluation mode against KV caches (Block.decode).

  caches: one cache per block, each stacked over iterations [R, ...] (iteration
  k attends to what iteration k wrote at earlier positions). -> (x, caches)."""
  stack = nnx.List(list(blocks))
  graphdef, state = nnx.split(stack)

  def body(h, xs):
    k, layer_caches = xs
    layers = nnx.merge(graphdef, state)
    new_caches = []
    for block, cache in zip(layers, layer_caches):
      h, cache = block.decode(h, loop_index=k, cache=cache, **call_kwargs)
      new_caches.append(cache)
    return h, new_caches

  x, caches = jax.lax.scan(body, x, (jnp.arange(iterations), list(caches)))
  return x, caches
