"""The registry of FFN sublayers a decoder block can hold.

Every sublayer is an nnx.Module with
    y, aux = sublayer(x, *, token_ids, loop_index, step, train)
where x is [batch, seq, d_model], `step` counts the optimizer steps done before
this one (None outside training; for scheduled auxiliary losses), and aux is a
flat dict of scalars (or per-expert vectors). Keys that
start with "loss/" are auxiliary losses, already weighted: the trainer adds them
to the objective. Every other key is a health metric that is only logged.
New sublayers (MoE variants) register a builder here; the trainer is untouched.
"""

from flax import nnx

from moejax.model.dense_ffn import swiglu
from moejax.registry import Registry

# name -> builder(cfg, layer_index, rngs) -> nnx.Module
BUILDERS: Registry = Registry("sublayer")
register = BUILDERS.register
names = BUILDERS.names


def build(cfg, layer_index: int, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the sublayer named by cfg.model.sublayer for block `layer_index`."""
  return BUILDERS.get(cfg.model.sublayer)(cfg, layer_index, rngs)


@register("dense")
def _dense(cfg, layer_index, rngs):
  del layer_index
  return swiglu(cfg, cfg.model.ffn_dim, rngs)


@register("moe")
def _moe(cfg, layer_index, rngs):
  from moejax.moe.layer import MoE  # pylint: disable=import-outside-toplevel
  if layer_index < cfg.moe.first_dense_layers:
    return _dense(cfg, layer_index, rngs)
  return MoE(cfg, layer_index, rngs)


@register("omnimoe")
def _omnimoe(cfg, layer_index, rngs):
  from moejax.papers.omnimoe.omnimoe import OmniMoE  # pylint: disable=import-outside-toplevel
  return OmniMoE(cfg, layer_index, rngs)


@register("peer")
def _peer(cfg, layer_index, rngs):
  from moejax.papers.omnimoe.peer import PEER  # pylint: disable=import-outside-toplevel
  return PEER(cfg, layer_index, rngs)


@register("mohge")
def _mohge(cfg, layer_index, rngs):
  from moejax.papers.mohge.mohge import MoHGE  # pylint: disable=import-outside-toplevel
  return MoHGE(cfg, layer_index, rngs)
