"""Top-k MoE: the layer (layer.py), its router and dispatch backends (router.py,
dispatch/), expert parallelism (expert_parallel.py), its config group (config.py)
and budget (budget.py), registered as the sublayer "moe"."""

from moejax import extensions
from moejax.model.sublayers import DENSE, Sublayer
from moejax.moe import budget, config


def _build(cfg, layer_index, rngs):
  if layer_index < cfg.moe.first_dense_layers:
    return DENSE.build(cfg, layer_index, rngs)
  from moejax.moe.layer import MoE  # pylint: disable=import-outside-toplevel
  return MoE(cfg, layer_index, rngs)


extensions.register(extensions.Extension(
    name="moe", group="moe", defaults=config.defaults, validate=config.validate,
    resume_free=config.RESUME_FREE,
    sublayers={"moe": Sublayer(build=_build, budget=budget.moe_budget)},
    notes="docs/papers/prior_work.md"))
