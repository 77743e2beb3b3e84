"""Decoder-only LM: embeddings, pre-norm blocks, final norm, (tied) unembedding.

  h = x + Attention(RMSNorm(x));   x' = h + FFN(RMSNorm(h))

The FFN slot holds any sublayer from moejax/model/sublayers.py. Aux outputs of
all blocks are combined: "loss/*" entries are summed over layers (each is a
term of the objective), metrics are averaged over layers.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model import sublayers
from moejax.model.attention import Attention
from moejax.model.norm import RMSNorm
from moejax.model.params import param
from moejax.sharding import constrain


class Block(nnx.Module):

  def __init__(self, cfg, layer_index: int, rngs: nnx.Rngs):
    m = cfg.model
    pd = jnp.dtype(m.param_dtype)
    self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps, param_dtype=pd)
    self.attn = Attention(m, rngs)
    self.ffn_norm = RMSNorm(m.d_model, eps=m.norm_eps, param_dtype=pd)
    self.ffn = sublayers.build(cfg, layer_index, rngs)

  def __call__(self, x, *, positions, segment_ids, token_ids, loop_index, step, train):
    x = x + self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids)
    y, aux = self.ffn(self.ffn_norm(x), token_ids=token_ids, loop_index=loop_index,
                      step=step, train=train)
    x = constrain(x + y.astype(x.dtype), ("batch", "seq", "act_embed"))
    return x, aux


def combine_aux(per_layer: list[dict]) -> dict:
  """Sums "loss/*" entries over layers and averages the metrics."""
  out, counts = {}, {}
  for aux in per_layer:
    for k, v in aux.items():
      out[k] = out.get(k, 0.0) + v
      counts[k] = counts.get(k, 0) + 1
  return {k: (v if k.startswith("loss/") else v / counts[k]) for k, v in out.items()}


class Transformer(nnx.Module):

  def __init__(self, cfg, vocab_size: int, rngs: nnx.Rngs):
    m = cfg.model
    pd = jnp.dtype(m.param_dtype)
    self.dtype = jnp.dtype(m.compute_dtype)
    self.tie_embeddings = m.tie_embeddings
    self.embed = param(rngs, (vocab_size, m.d_model), ("vocab", "embed"),
                       std=1.0 if not m.tie_embeddings else m.init_std, dtype=pd)
    self.blocks = nnx.List([Block(cfg, i, rngs) for i in range(m.num_layers)])
    self.final_norm = RMSNorm(m.d_model, eps=m.norm_eps, param_dtype=pd)
    if not m.tie_embeddings:
      self.unembed = param(rngs, (m.d_model, vocab_size), ("embed", "vocab"),
                           std=m.init_std, dtype=pd)

  def __call__(self, tokens, *, positions=None, segment_ids=None, step=None, train=False):
    """tokens: [batch, seq] int -> (logits [batch, seq, vocab] float32, aux).

    step: optimizer steps completed before this one (an int array), for sublayers
    whose auxiliary losses follow a schedule; None outside training."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    # Gather the table whole before the lookup (FSDP semantics): a gather from a
    # table split over (vocab, embed) makes XLA replicate it the slow way.
    table = constrain(self.embed[...], (None, None))
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)
    x = constrain(x, ("batch", "seq", "act_embed"))
    per_layer = []
    for block in self.blocks:
      x, aux = block(x, positions=positions, segment_ids=segment_ids, token_ids=tokens,
                     loop_index=None, step=step, train=train)
      per_layer.append(aux)
    x = self.final_norm(x)
    # Logits accumulate in float32 even with bf16 inputs: at |logit| ~ 10 a bf16
    # result would be rounded to 1/16 before the loss sees it.
    if self.tie_embeddings:
      logits = jnp.einsum("bsd,vd->bsv", x, self.embed[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("bsd,dv->bsv", x, self.unembed[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
    logits = constrain(logits, ("batch", "seq", "vocab"))
    return logits.astype(jnp.float32), combine_aux(per_layer)
