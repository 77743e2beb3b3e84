"""OmniMoE (atomic experts with a product-key router) and its PEER baseline.

  omnimoe.py, peer.py      the sublayers
  atomic_layer.py          what both share: expert tables, paths, expert parallelism
  atomic_experts.py        the atomic-expert paths (gather, expert_sorted, pallas)
  product_router.py        top-k over a sqrt(N) x sqrt(N) grid
  batch_norm.py            the router's token BatchNorm
  parallel.py              experts split over the expert mesh axis
  config.py, budget.py     the `atomic` config group and the budgets
Notes on the paper: docs/papers/omnimoe.md.
"""

from moejax import extensions
from moejax.model.sublayers import Sublayer
from moejax.papers.omnimoe import budget, config


def _omnimoe(cfg, layer_index, rngs):
  from moejax.papers.omnimoe.omnimoe import OmniMoE  # pylint: disable=import-outside-toplevel
  return OmniMoE(cfg, layer_index, rngs)


def _peer(cfg, layer_index, rngs):
  from moejax.papers.omnimoe.peer import PEER  # pylint: disable=import-outside-toplevel
  return PEER(cfg, layer_index, rngs)


extensions.register(extensions.Extension(
    name="omnimoe", group="atomic", defaults=config.defaults, validate=config.validate,
    resume_free=config.RESUME_FREE,
    sublayers={"omnimoe": Sublayer(build=_omnimoe, budget=budget.omnimoe_budget),
               "peer": Sublayer(build=_peer, budget=budget.peer_budget)},
    notes="docs/papers/omnimoe.md"))
