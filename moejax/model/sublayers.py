"""The FFN sublayers a decoder block can hold: "dense", plus every extension's.

Every sublayer is an nnx.Module with
    y, aux = sublayer(x, *, token_ids, loop_index, step, train)
where x is [batch, seq, d_model], `step` counts the optimizer steps done before
this one (None outside training; for scheduled auxiliary losses), and aux is a
flat dict of scalars (or per-expert vectors). Keys that start with "loss/" are
auxiliary losses, already weighted: the trainer adds them to the objective.
Every other key is a health metric that is only logged.

A paper adds a sublayer through its Extension (moejax/extensions.py):
    sublayers={"mohge": Sublayer(build=MoHGE, budget=mohge_budget)}
and neither this file nor the trainer changes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from flax import nnx

from moejax import extensions
from moejax.model.dense_ffn import swiglu


@dataclasses.dataclass(frozen=True)
class Sublayer:
  """build(cfg, layer_index, rngs) -> nnx.Module; budget(cfg, layer_index) -> dict of
  params, active_params, flops_per_token (and breakdown entries summed over layers)."""
  build: Callable
  budget: Callable


def swiglu_budget(d_model: int, width: int) -> dict:
  """A SwiGLU of hidden width `width`: three [d, width] matrices."""
  p = 3 * d_model * width
  return dict(params=p, active_params=p, flops_per_token=2 * p)


def _dense(cfg, layer_index, rngs):
  del layer_index
  return swiglu(cfg, cfg.model.ffn_dim, rngs)


def _dense_budget(cfg, layer_index) -> dict:
  del layer_index
  return swiglu_budget(cfg.model.d_model, cfg.model.ffn_dim)


DENSE = Sublayer(build=_dense, budget=_dense_budget)


def get(name: str) -> Sublayer:
  if name == "dense":
    return DENSE
  for ext in extensions.registered():
    if name in ext.sublayers:
      return ext.sublayers[name]
  raise KeyError(f"Unknown sublayer {name!r}; known: {names()}.")


def names() -> list[str]:
  return sorted(["dense"] + [n for ext in extensions.registered() for n in ext.sublayers])


def build(cfg, layer_index: int, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the sublayer named by cfg.model.sublayer for block `layer_index`."""
  return get(cfg.model.sublayer).build(cfg, layer_index, rngs)


def budget(cfg, layer_index: int) -> dict:
  """The budget of block `layer_index`'s sublayer (see Sublayer)."""
  return get(cfg.model.sublayer).budget(cfg, layer_index)
