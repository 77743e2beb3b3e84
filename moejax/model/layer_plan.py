"""The decoder's layer plan: which blocks run, how often, and what sits between them.

By default the plan is num_layers blocks in a row. Extensions change it
(Extension.layer_plan, moejax/extensions.py) with two generic mechanisms:

  a looped segment   blocks [loop_start, loop_end) run `iterations` times with
                     shared weights (moejax/model/loop.py); `modulators(cfg,
                     layer_index, rngs)` may give each looped block's two
                     pre-norms a module that conditions them on the iteration
                     (LoopMoE's IterAdaLN), and `remat` recomputes an
                     iteration's activations in the backward pass;
  inserted layers    after the blocks listed in `after` (counting unique
                     blocks, a looped segment once), x <- x + layer(x, token_ids).
                     The layers live in the model under the extension's name.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from moejax import extensions


@dataclasses.dataclass
class Inserted:
  """Layers one extension inserts: build(cfg, after_layer, inputs, rngs) -> nnx.Module
  with y, aux = layer(x, *, token_ids, loop_index, step, train); `inputs` is what the
  extension's model_inputs hook returned."""
  name: str
  after: tuple[int, ...]
  build: Callable


@dataclasses.dataclass
class LayerPlan:
  num_layers: int
  loop_start: int = 0
  loop_end: int = 0
  iterations: int = 1
  remat: bool = False
  modulators: Callable | None = None
  inserted: list[Inserted] = dataclasses.field(default_factory=list)

  @property
  def looped(self) -> bool:
    return self.loop_end > self.loop_start

  def applications(self) -> list[int]:
    """How many times each unique block runs per token (`iterations` inside the loop)."""
    return [self.iterations if self.loop_start <= i < self.loop_end else 1
            for i in range(self.num_layers)]


def build(cfg) -> LayerPlan:
  """The plan of `cfg`: the plain stack, then each extension's changes in turn."""
  plan = LayerPlan(num_layers=cfg.model.num_layers)
  for ext in extensions.registered():
    if ext.layer_plan is not None:
      plan = ext.layer_plan(cfg, plan) or plan
  return plan


def layer_applications(cfg) -> list[int]:
  """How many times each unique decoder layer runs per token."""
  return build(cfg).applications()
