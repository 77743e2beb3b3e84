"""A fifth paper, written entirely under tests/: the "toy" sublayer, a ReLU^p FFN

    y = relu(x W_in)^p W_out        (p = toy.power, 1 or 2)

with its own config group, validation, resume-fixed fields, budget, presets
(presets.py) and a one-row experiment (experiment.py). Importing this package
registers it; no file outside tests/ knows its name. docs/design.md, "Adding a
paper", lists these steps.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moejax import extensions
from moejax.config.checks import positive, require
from moejax.model.params import param, residual_depth
from moejax.model.sublayers import Sublayer


def defaults() -> ml_collections.ConfigDict:
  g = ml_collections.ConfigDict()
  g.width = 256  # hidden width of the FFN
  g.power = 2  # 1: ReLU, 2: squared ReLU
  return g


def validate(cfg, axes: dict) -> None:
  del axes
  if cfg.model.sublayer != "toy":
    return
  positive("toy", cfg.toy, "width")
  require(cfg.toy.power in (1, 2),
          f"--config.toy.power={cfg.toy.power} must be 1 (ReLU) or 2 (squared ReLU).")


class ToyFFN(nnx.Module):

  def __init__(self, cfg, layer_index: int, rngs: nnx.Rngs):
    del layer_index
    m, t = cfg.model, cfg.toy
    self.power = t.power
    self.w_in = param(rngs, (m.d_model, t.width), ("embed", "mlp"), std=m.init_std)
    self.w_out = param(rngs, (t.width, m.d_model), ("mlp", "embed"),
                       std=m.init_std / math.sqrt(2 * residual_depth(cfg)))

  def __call__(self, x, *, token_ids=None, loop_index=None, step=None, train=False):
    del token_ids, loop_index, step, train
    h = jax.nn.relu(x @ self.w_in[...]) ** self.power
    return h @ self.w_out[...], {"toy_active_fraction": jnp.mean(h > 0)}


def budget(cfg, layer_index: int) -> dict:
  del layer_index
  p = 2 * cfg.model.d_model * cfg.toy.width
  return dict(params=p, active_params=p, flops_per_token=2 * p)


EXTENSION = extensions.register(extensions.Extension(
    name="toy", group="toy", defaults=defaults, validate=validate,
    sublayers={"toy": Sublayer(build=ToyFFN, budget=budget)}))
