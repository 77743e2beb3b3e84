"""LoopMoE's layer plan: prefix_layers unique blocks, then block_layers blocks run
`iterations` times with shared weights, then the rest; each looped block's two
pre-norms modulated by IterAdaLN (loop.iter_adaln; off = "Loop Base")."""

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.layer_plan import LayerPlan
from moejax.papers.loopmoe.iter_adaln import IterAdaLN


def iter_adaln_modulators(cfg, layer_index: int):
  """IterAdaLN for the attention and FFN pre-norms of looped block `layer_index`.

  Its own random stream, so that adding IterAdaLN leaves every other initial
  weight as in the plain loop (a clean Loop Base ablation)."""
  m, lp = cfg.model, cfg.loop
  keys = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), 1_000 + layer_index))
  return tuple(IterAdaLN(m.d_model, lp.adaln_dim, lp.adaln_pe_dim, gate=lp.adaln_gate,
                         init_std=m.init_std, rngs=nnx.Rngs(params=k),
                         param_dtype=jnp.dtype(m.param_dtype))
               for k in keys)


def add_loop(cfg, plan: LayerPlan) -> LayerPlan:
  lp = cfg.loop
  if lp.block_layers == 0:
    return plan
  plan.loop_start = lp.prefix_layers
  plan.loop_end = lp.prefix_layers + lp.block_layers
  plan.iterations, plan.remat = lp.iterations, lp.remat
  if lp.iter_adaln:
    plan.modulators = iter_adaln_modulators
  return plan
