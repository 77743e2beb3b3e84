"""Expert parallelism: experts split over the `expert` mesh axis, tokens exchanged
with all-to-all inside `jax.shard_map`.

Tokens are split over (data, fsdp, expert) and experts over `expert`, so each
device holds T_l tokens and E_l = E / EP experts. Per device:

  1. sort its T_l*k pairs by destination shard (expert // E_l) and write them
     into a send buffer [EP, C, d]; C = T_l*k is dropless (any routing fits);
     ep_capacity_factor > 0 caps C at cf * T_l*k / EP and counts what is cut;
  2. all_to_all over `expert`: buffer slot [s] goes to shard s;
  3. run the received rows through the local experts with a dropless backend
     (each row is a "token" with one expert, weight 1; empty slots have none);
     with a `tensor` axis each device holds a slice of the expert FFN width, so
     the partial outputs are summed over `tensor`;
  4. all_to_all back, and combine each token's k outputs with its router weights.

Routing and all balancing statistics stay outside this function, on global
arrays (see load_balance.py). Expert weights enter with their `fsdp` split
gathered (one all-gather at entry, as in MaxText); gradients of weights that are
replicated over data/fsdp are summed over those axes by shard_map's transpose.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.moe import dispatch
from pallas_kernels.row_gather import dispatch_rows, gather_pairs
from moejax.sharding import BATCH_AXES


# (w_gate, w_up, w_down) stacks: experts over `expert`, the hidden width over `tensor`.
SWIGLU_SPECS = (P("expert", None, "tensor"), P("expert", None, "tensor"),
                P("expert", "tensor", None))


def send_capacity(pairs_per_device: int, ep: int, ep_capacity_factor: float) -> int:
  if ep_capacity_factor <= 0:
    return pairs_per_device
  return min(pairs_per_device, max(1, math.ceil(ep_capacity_factor * pairs_per_device / ep)))


def expert_parallel_ffn(x, expert_idx, combine_weights, w_gate, w_up, w_down, *, mesh,
                        local_backend: str, block_size: int, ep_capacity_factor: float):
  """Same contract as dispatch.expert_ffn; returns (y, dropped pairs over all shards)."""
  local_experts = w_gate.shape[0] // mesh.shape["expert"]

  def local_ffn(rows, ids, weights):
    wg, wu, wd = weights
    out, _ = dispatch.expert_ffn(local_backend, rows, ids, jnp.ones(ids.shape, jnp.float32),
                                 wg, wu, wd, block_size=block_size)
    return out

  return exchange_ffn(x, expert_idx, combine_weights, (w_gate, w_up, w_down),
                      SWIGLU_SPECS, num_experts=w_gate.shape[0], mesh=mesh,
                      shard_and_local=lambda e: (e // local_experts, e % local_experts),
                      num_local=local_experts, local_ffn=local_ffn,
                      ep_capacity_factor=ep_capacity_factor,
                      check_vma=local_backend != "pallas")


def exchange_ffn(x, expert_idx, combine_weights, weights, weight_specs, *, num_experts: int,
                 mesh, shard_and_local, num_local: int, local_ffn,
                 ep_capacity_factor: float, check_vma: bool = True):
  """Steps 1-4 of the module docstring around any local expert computation.

  shard_and_local(e) -> (shard holding expert e, its id among that shard's
  num_local experts); local_ffn(rows [R, d], ids [R, 1], weights) runs the local
  experts on the received rows (id num_local = an empty slot); `weights` is a
  tuple of expert stacks, split as `weight_specs` says. check_vma=False is for
  Pallas local kernels: jax 0.10's Pallas interpreter (CPU) cannot index refs
  whose varying axes differ from the program id's, so the type check is off
  there (the sharded-equals-unsharded tests cover the gradients' reductions)."""
  ep = mesh.shape["expert"]
  batch = P(BATCH_AXES, None)

  def per_shard(x, idx, cw, *weights):
    num_tokens, k = idx.shape
    num_pairs = num_tokens * k
    cap = send_capacity(num_pairs, ep, ep_capacity_factor)
    flat = idx.reshape(-1)
    shard, local = shard_and_local(flat)
    dest = jnp.where(flat < num_experts, shard, ep)
    order = jnp.argsort(dest, stable=True).astype(jnp.int32)
    dest_sorted = dest[order]
    sizes = jnp.bincount(dest, length=ep + 1)[:ep]
    start = jnp.cumsum(sizes) - sizes
    rank = jnp.arange(num_pairs, dtype=jnp.int32) - start[jnp.minimum(dest_sorted, ep - 1)]
    routed = dest_sorted < ep
    kept = routed & (rank < cap)
    slot = jnp.where(kept, dest_sorted * cap + rank, ep * cap).astype(jnp.int32)
    pair_slot = jnp.zeros(num_pairs, jnp.int32).at[order].set(slot)
    slot_pair = jnp.full(ep * cap, num_pairs, jnp.int32).at[slot].set(order, mode="drop")
    send = dispatch_rows(x, slot_pair, pair_slot, k).reshape(ep, cap, -1)
    local_of_pair = jnp.where(flat < num_experts, local, num_local)
    local_id = jnp.take(local_of_pair, slot_pair, mode="fill",
                        fill_value=num_local).reshape(ep, cap)
    recv = jax.lax.all_to_all(send, "expert", 0, 0)
    recv_id = jax.lax.all_to_all(local_id, "expert", 0, 0)
    out = local_ffn(recv.reshape(ep * cap, -1), recv_id.reshape(-1, 1), weights)
    out = jax.lax.psum(out, "tensor")
    back = jax.lax.all_to_all(out.reshape(ep, cap, -1), "expert", 0, 0)
    pair_out = gather_pairs(back.reshape(ep * cap, -1), pair_slot, slot_pair)
    y = jnp.einsum("tk,tkd->td", cw.astype(jnp.float32), pair_out.reshape(num_tokens, k, -1),
                   preferred_element_type=jnp.float32).astype(x.dtype)
    dropped = jax.lax.psum(jnp.sum(routed & ~kept).astype(jnp.int32), BATCH_AXES)
    return y, dropped

  return jax.shard_map(
      per_shard, mesh=mesh, in_specs=(batch, batch, batch, *weight_specs),
      out_specs=(batch, P()), check_vma=check_vma)(x, expert_idx, combine_weights, *weights)
