"""What OmniMoE and PEER share: expert tables, the shared SwiGLU, and the layer body.

    tokens -> route (the subclass: gates [T, k'], expert ids [T, k'])
           -> y = SharedSwiGLU(x) + sum_j g_j act(u_idx_j . x) v_idx_j
The routed sum runs through atomic_experts.py, or parallel.py when the
mesh has an `expert` axis larger than one. Health metrics: load entropy and
max/mean over all N experts, dead_fraction (experts no token chose in this
batch), gate_mass (mean sum of a token's gates).
"""

import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.papers.omnimoe.parallel import atomic_expert_parallel
from moejax.model import load_balance as lb
from moejax.papers.omnimoe.atomic_experts import atomic_ffn
from moejax.model.params import param


def atomic_tables(rngs, num_experts: int, d_model: int, std: float, dtype):
  """The input and output vector tables of N atomic experts, [N, d] each."""
  axes = ("expert", "embed")
  return (param(rngs, (num_experts, d_model), axes, std=std, dtype=dtype),
          param(rngs, (num_experts, d_model), axes, std=std, dtype=dtype))


def routed_atomic(path, tokens, expert_idx, gates, expert_in, expert_out, activation):
  """Atomic experts, through expert parallelism when the mesh has an expert axis."""
  mesh = sharding.active_mesh()
  if mesh is not None and mesh.shape["expert"] > 1:
    return atomic_expert_parallel(path, tokens, expert_idx, gates, expert_in, expert_out,
                                  mesh=mesh, activation=activation)
  return atomic_ffn(path, tokens, expert_idx, gates, expert_in, expert_out,
                    activation=activation)


def atomic_health(expert_idx, gates, num_experts: int) -> dict:
  counts = lb.expert_counts(expert_idx, num_experts)
  aux = lb.health_metrics(counts, jnp.int32(0))
  del aux["dropped_fraction"]
  aux["dead_fraction"] = jnp.mean((counts == 0).astype(jnp.float32))
  aux["gate_mass"] = jnp.mean(jnp.sum(gates, axis=-1))
  return aux


class AtomicLayer(nnx.Module):
  """Subclasses set dtype, num_experts, path, expert_in, expert_out, shared and
  `activation`, and define route(tokens, train=) -> (gates, expert ids)."""

  activation = "silu"

  def route(self, tokens, *, train: bool):
    raise NotImplementedError

  def extra_metrics(self) -> dict:
    return {}

  def __call__(self, x, *, token_ids=None, loop_index=None, step=None, train=False):
    del token_ids, loop_index, step
    batch, seq, d_model = x.shape
    x = x.astype(self.dtype)
    tokens = x.reshape(batch * seq, d_model)
    gates, idx = self.route(tokens, train=train)
    y = routed_atomic(self.path, tokens, idx, gates, self.expert_in[...],
                      self.expert_out[...], self.activation).reshape(batch, seq, d_model)
    if self.shared is not None:
      y = y + self.shared(x)[0]
    return y, {**atomic_health(idx, gates, self.num_experts), **self.extra_metrics()}
