"""L3's place in the layer plan: an L3 layer after each decoder layer listed in
l3.after_layers (unique layers; a looped block counts once)."""

from moejax.model.layer_plan import Inserted, LayerPlan


def _build(cfg, after_layer: int, counts, rngs):
  from moejax.papers.l3.layer import L3Layer  # pylint: disable=import-outside-toplevel
  if counts is None:
    raise ValueError("cfg.l3.after_layers is set: pass the rows per token id as "
                     "inputs={'l3': counts} (moejax/papers/l3/allocation.py).")
  return L3Layer(cfg, after_layer, counts, rngs)


def add_l3_layers(cfg, plan: LayerPlan) -> LayerPlan:
  after = tuple(int(p) for p in cfg.l3.after_layers)
  if after:
    plan.inserted.append(Inserted(name="l3", after=after, build=_build))
  return plan
