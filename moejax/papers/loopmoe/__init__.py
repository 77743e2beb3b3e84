"""LoopMoE: a block of MoE layers looped with shared weights, conditioned on the
iteration by IterAdaLN.

  plan.py         the looped segment and its IterAdaLN modulators in the layer plan
  iter_adaln.py   IterAdaLN
  balance.py      sizes a looped model to a vanilla MoE's budget (balance_loop)
  config.py, budget.py   the `loop` config group and what IterAdaLN costs
The loop itself is generic (moejax/model/loop.py). Notes: docs/papers/loopmoe.md.
"""

from moejax import extensions
from moejax.papers.loopmoe import budget, config, plan

extensions.register(extensions.Extension(
    name="loopmoe", group="loop", defaults=config.defaults, validate=config.validate,
    resume_free=config.RESUME_FREE, layer_plan=plan.add_loop, budget=budget.loop_budget,
    notes="docs/papers/loopmoe.md"))
