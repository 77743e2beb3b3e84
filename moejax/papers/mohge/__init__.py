"""MoHGE: heterogeneous expert groups with a two-level router.

  mohge.py          the sublayer
  group_router.py   groups, then experts inside the chosen groups
  balance.py        the size-weighted group loss and the intra-group loss
  placement.py      expert order over expert-parallel shards (and its CLI)
  config.py, budget.py   the `mohge` config group and the budget
Notes on the paper: docs/papers/mohge.md.
"""

from moejax import extensions
from moejax.model.sublayers import Sublayer
from moejax.papers.mohge import budget, config, plots


def _mohge(cfg, layer_index, rngs):
  from moejax.papers.mohge.mohge import MoHGE  # pylint: disable=import-outside-toplevel
  return MoHGE(cfg, layer_index, rngs)


extensions.register(extensions.Extension(
    name="mohge", group="mohge", defaults=config.defaults, validate=config.validate,
    resume_free=config.RESUME_FREE, resume_warnings=config.resume_warnings,
    sublayers={"mohge": Sublayer(build=_mohge, budget=budget.mohge_budget)},
    plots={"group_traffic.png": plots.plot_group_traffic}, notes="docs/papers/mohge.md"))
