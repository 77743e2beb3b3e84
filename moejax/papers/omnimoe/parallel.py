"""Expert parallelism for atomic (single-neuron) experts: tables split over `expert`.

The [N, d] tables U and V are split into EP row blocks, one per `expert` shard.
A token's k experts are scattered over the whole table, so instead of sending
each (token, slot) pair to its expert's shard (k rows of d per token, as the
top-k MoE does in expert_parallel.py) every shard gathers the tokens of its
`expert` group once (all_gather: (EP - 1) rows of d per token), evaluates the
pairs with the experts of other shards counted as "no expert" (they read zero
rows and add nothing), and the partial outputs are summed in float32 and split
back with one reduce-scatter. The reduce-scatter is float32 for accuracy, so
with bfloat16 activations it moves twice the bytes of a bfloat16 one: this moves
no more data than the all-to-all would whenever EP <= k (float32 activations)
or EP <= k / 2 (bfloat16), needs no buffer capacity, and never drops a pair.

The cost: every shard evaluates all EP * T_l * k pairs of its group (the
foreign ones as zeros), i.e. EP times the per-device work of data parallelism,
in exchange for holding 1/EP of the tables. Use it when the tables do not fit
on one device; otherwise plain data/fsdp parallelism is cheaper. Compacting
the local pairs (a dynamic trip count over them) is future work. Routing and
its BatchNorm statistics stay outside, on global arrays. The Pallas path runs
with shard_map's varying-axes check off (see expert_parallel.exchange_ffn).
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.moe.dispatch.block_swiglu import varying_zeros
from moejax.papers.omnimoe.atomic_experts import atomic_ffn
from moejax.sharding import BATCH_AXES


def atomic_expert_parallel(path: str, x, expert_idx, gates, up, down, *, mesh,
                           activation: str = "silu"):
  """Same contract as atomic_experts.atomic_ffn, with up/down split over `expert`."""
  ep = mesh.shape["expert"]
  local = up.shape[0] // ep

  def per_shard(x, idx, g, up, down):
    xg = jax.lax.all_gather(x, "expert", axis=0, tiled=True)
    ig = jax.lax.all_gather(idx, "expert", axis=0, tiled=True)
    gg = jax.lax.all_gather(g, "expert", axis=0, tiled=True)
    me = jax.lax.axis_index("expert")
    local_idx = jnp.where(ig // local == me, ig % local, local).astype(jnp.int32)
    # One varying-axes type for tokens and tables (custom VJPs inside need it).
    zero = varying_zeros((), jnp.float32, xg, up, down)
    xg, gg = xg + zero.astype(xg.dtype), gg + zero.astype(gg.dtype)
    y = atomic_ffn(path, xg, local_idx, gg, up, down, activation=activation,
                   out_dtype=jnp.float32)
    return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True).astype(x.dtype)

  batch = P(BATCH_AXES, None)
  return jax.shard_map(
      per_shard, mesh=mesh,
      in_specs=(batch, batch, batch, P("expert", None), P("expert", None)),
      out_specs=batch, check_vma=path != "pallas")(x, expert_idx, gates, up, down)
