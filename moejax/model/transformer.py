"""Decoder-only LM: embeddings, pre-norm blocks, final norm, (tied) unembedding.

  h = x + Attention(RMSNorm(x));   x' = h + FFN(RMSNorm(h))

The FFN slot holds any sublayer from moejax/model/sublayers.py. Aux outputs of
all blocks are combined: "loss/*" entries are summed over layers (each is a
term of the objective), metrics are averaged over layers.

Two additions change the layer plan:
  * a looped block (cfg.loop, LoopMoE): layers [prefix, prefix + block_layers)
    run loop.iterations times with shared weights (moejax/model/loop.py), their
    pre-norms modulated by IterAdaLN (moejax/papers/loopmoe/iter_adaln.py);
  * L3 lookup layers (cfg.l3): after the decoder layers listed in
    l3.after_layers, x <- x + L3(x, token ids) (moejax/papers/l3/layer.py).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model import sublayers
from moejax.model.attention import Attention
from moejax.papers.loopmoe.iter_adaln import IterAdaLN
from moejax.model.loop import run_loop
from moejax.model.norm import RMSNorm
from moejax.model.params import param, residual_depth
from moejax.sharding import constrain


def _gated(y, gate):
  return y if gate is None else gate * y


class Block(nnx.Module):
  """A pre-norm decoder layer; with `iter_adaln`, each pre-norm is modulated by
  the iteration index and the token's state (IterAdaLN)."""

  def __init__(self, cfg, layer_index: int, rngs: nnx.Rngs, *, iter_adaln: bool = False):
    m = cfg.model
    pd = jnp.dtype(m.param_dtype)
    self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps, param_dtype=pd)
    self.attn = Attention(m, rngs, depth=residual_depth(cfg))
    self.ffn_norm = RMSNorm(m.d_model, eps=m.norm_eps, param_dtype=pd)
    self.ffn = sublayers.build(cfg, layer_index, rngs)
    mods = [None, None]
    if iter_adaln:
      # Its own random stream, so that adding IterAdaLN leaves every other
      # initial weight as in the plain loop (a clean Loop Base ablation).
      lp = cfg.loop
      keys = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), 1_000 + layer_index))
      mods = [IterAdaLN(m.d_model, lp.adaln_dim, lp.adaln_pe_dim, gate=lp.adaln_gate,
                        init_std=m.init_std, rngs=nnx.Rngs(params=k), param_dtype=pd)
              for k in keys]
    self.attn_mod = nnx.data(mods[0])
    self.ffn_mod = nnx.data(mods[1])

  def _modulate(self, mod, n, loop_index):
    return (n, None) if mod is None else mod(n, loop_index)

  def __call__(self, x, *, positions, segment_ids, token_ids, loop_index, step, train):
    n, gate = self._modulate(self.attn_mod, self.attn_norm(x), loop_index)
    x = x + _gated(self.attn(n, positions=positions, segment_ids=segment_ids), gate)
    n, gate = self._modulate(self.ffn_mod, self.ffn_norm(x), loop_index)
    y, aux = self.ffn(n, token_ids=token_ids, loop_index=loop_index, step=step, train=train)
    x = constrain(x + _gated(y, gate).astype(x.dtype), ("batch", "seq", "act_embed"))
    return x, aux


def combine_aux(per_layer: list[dict], weights: list[float] | None = None) -> dict:
  """Sums "loss/*" entries over layers and averages the metrics, each entry
  weighted by the layer passes it stands for (a looped block's entry already
  averages block_layers x iterations passes)."""
  weights = weights or [1.0] * len(per_layer)
  out, counts = {}, {}
  for aux, w in zip(per_layer, weights):
    for k, v in aux.items():
      loss = k.startswith("loss/")
      out[k] = out.get(k, 0.0) + (v if loss else w * v)
      counts[k] = counts.get(k, 0) + w
  return {k: (v if k.startswith("loss/") else v / counts[k]) for k, v in out.items()}


class Transformer(nnx.Module):

  def __init__(self, cfg, vocab_size: int, rngs: nnx.Rngs, *, l3_counts=None):
    """l3_counts: rows per token id of the L3 tables (moejax/papers/l3/allocation.py);
    needed when cfg.l3.after_layers is not empty."""
    m, lp = cfg.model, cfg.loop
    pd = jnp.dtype(m.param_dtype)
    self.dtype = jnp.dtype(m.compute_dtype)
    self.tie_embeddings = m.tie_embeddings
    self.embed = param(rngs, (vocab_size, m.d_model), ("vocab", "embed"),
                       std=1.0 if not m.tie_embeddings else m.init_std, dtype=pd)
    self.loop_start = lp.prefix_layers if lp.block_layers > 0 else m.num_layers
    self.loop_end = self.loop_start + lp.block_layers
    self.iterations, self.remat = lp.iterations, lp.remat
    self.blocks = nnx.List([
        Block(cfg, i, rngs, iter_adaln=lp.iter_adaln and self.loop_start <= i < self.loop_end)
        for i in range(m.num_layers)])
    self.l3_after = tuple(int(p) for p in cfg.l3.after_layers)
    if self.l3_after:
      from moejax.papers.l3.layer import L3Layer  # pylint: disable=import-outside-toplevel
      if l3_counts is None:
        raise ValueError("cfg.l3.after_layers is set: pass l3_counts (rows per token id).")
      self.l3 = nnx.List([L3Layer(cfg, p, l3_counts, rngs) for p in self.l3_after])
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
    per_layer, weights = [], []
    kwargs = dict(positions=positions, segment_ids=segment_ids, token_ids=tokens,
                  step=step, train=train)
    i = 0
    while i < len(self.blocks):
      if i == self.loop_start:
        x, aux = run_loop(list(self.blocks)[self.loop_start:self.loop_end], x,
                          iterations=self.iterations, remat=self.remat,
                          combine_aux=combine_aux, **kwargs)
        weights.append(float((self.loop_end - self.loop_start) * self.iterations))
        i = self.loop_end
      else:
        x, aux = self.blocks[i](x, loop_index=None, **kwargs)
        weights.append(1.0)
        i += 1
      per_layer.append(aux)
      if i in self.l3_after:
        y, aux = self.l3[self.l3_after.index(i)](x, token_ids=tokens, loop_index=None,
                                                 step=step, train=train)
        x = constrain(x + y.astype(x.dtype), ("batch", "seq", "act_embed"))
        per_layer.append(aux)
        weights.append(1.0)
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
    return logits.astype(jnp.float32), combine_aux(per_layer, weights)
