"""Decoder-only LM: embeddings, pre-norm blocks, final norm, (tied) unembedding.

  h = x + Attention(RMSNorm(x));   x' = h + FFN(RMSNorm(h))

The FFN slot holds any sublayer from moejax/model/sublayers.py. Aux outputs of
all blocks are combined: "loss/*" entries are summed over layers (each is a
term of the objective), metrics are averaged over layers.

The layer plan (moejax/model/layer_plan.py), which extensions may change, adds
two things: a looped segment of blocks run several times with shared weights
(moejax/model/loop.py), whose pre-norms a modulator may condition on the
iteration, and layers inserted between blocks, x <- x + layer(x, token ids).

`decode` runs the same layers in evaluation mode on new tokens against a KV
cache (moejax/model/attention.py), for sampling: every sublayer is per-token in
evaluation (dropless routing, BatchNorm running statistics, L3 reads by token
id), so only attention needs the earlier positions.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model import layer_plan, sublayers
from moejax.model.attention import Attention
from moejax.model.loop import decode_loop, run_loop
from moejax.model.norm import RMSNorm
from moejax.model.params import param, residual_depth
from moejax.sharding import constrain


def _gated(y, gate):
  return y if gate is None else gate * y


class Block(nnx.Module):
  """A pre-norm decoder layer. `modulators(cfg, layer_index)`, if given, returns a
  module for each pre-norm (attention, FFN), or None, that maps (normed x,
  loop_index) -> (modulated x, output gate or None)."""

  def __init__(self, cfg, layer_index: int, rngs: nnx.Rngs, *, modulators=None):
    m = cfg.model
    pd = jnp.dtype(m.param_dtype)
    self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps, param_dtype=pd)
    self.attn = Attention(m, rngs, depth=residual_depth(cfg))
    self.ffn_norm = RMSNorm(m.d_model, eps=m.norm_eps, param_dtype=pd)
    self.ffn = sublayers.build(cfg, layer_index, rngs)
    mods = modulators(cfg, layer_index) if modulators is not None else (None, None)
    self.attn_mod = nnx.data(mods[0])
    self.ffn_mod = nnx.data(mods[1])

  def _modulate(self, mod, n, loop_index):
    return (n, None) if mod is None else mod(n, loop_index)

  def __call__(self, x, *, positions, segment_ids, token_ids, loop_index, step, train):
    n, gate = self._modulate(self.attn_mod, self.attn_norm(x), loop_index)
    x = x + _gated(self.attn(n, positions=positions, segment_ids=segment_ids), gate)
    return self._ffn_residual(x, token_ids=token_ids, loop_index=loop_index, step=step,
                              train=train)

  def decode(self, x, *, positions, token_ids, loop_index, cache):
    """The evaluation-mode forward of new tokens against a KV cache -> (x, cache)."""
    n, gate = self._modulate(self.attn_mod, self.attn_norm(x), loop_index)
    y, cache = self.attn.decode(n, positions=positions, cache=cache)
    x, _ = self._ffn_residual(x + _gated(y, gate), token_ids=token_ids,
                              loop_index=loop_index, step=None, train=False)
    return x, cache

  def _ffn_residual(self, x, *, token_ids, loop_index, step, train):
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

  def __init__(self, cfg, vocab_size: int, rngs: nnx.Rngs, *, inputs: dict | None = None):
    """inputs: {extension name: what its model_inputs hook returned} for extensions
    whose inserted layers need data before they are built (e.g. L3's rows per
    token id)."""
    m = cfg.model
    plan = layer_plan.build(cfg)
    inputs = inputs or {}
    pd = jnp.dtype(m.param_dtype)
    self.dtype = jnp.dtype(m.compute_dtype)
    self.tie_embeddings = m.tie_embeddings
    self.embed = param(rngs, (vocab_size, m.d_model), ("vocab", "embed"),
                       std=1.0 if not m.tie_embeddings else m.init_std, dtype=pd)
    self.loop_start = plan.loop_start if plan.looped else m.num_layers
    self.loop_end = plan.loop_end if plan.looped else m.num_layers
    self.iterations, self.remat = plan.iterations, plan.remat
    self.blocks = nnx.List([
        Block(cfg, i, rngs, modulators=plan.modulators
              if self.loop_start <= i < self.loop_end else None)
        for i in range(m.num_layers)])
    # Inserted layers, held under their extension's name: after layer p, the
    # layers of every extension that inserts there, in registration order.
    for ins in plan.inserted:
      setattr(self, ins.name, nnx.List([ins.build(cfg, p, inputs.get(ins.name), rngs)
                                        for p in ins.after]))
    self.inserted_after = tuple(sorted((int(p), k, ins.name, j)
                                       for k, ins in enumerate(plan.inserted)
                                       for j, p in enumerate(ins.after)))
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
    logits, aux, _ = self._forward(tokens, positions=positions, segment_ids=segment_ids,
                                   step=step, train=train, cache=None)
    return logits, aux

  def init_cache(self, batch: int, max_len: int) -> list:
    """An empty KV cache for `decode`: one entry per block, and for each looped
    block one per iteration (stacked on a leading axis)."""
    cache = []
    for i, block in enumerate(self.blocks):
      entry = block.attn.init_cache(batch, max_len)
      if self.loop_start <= i < self.loop_end:
        entry = jax.tree.map(lambda a: jnp.broadcast_to(a, (self.iterations,) + a.shape),
                             entry)
      cache.append(entry)
    return cache

  def decode(self, tokens, *, positions, cache):
    """Evaluation-mode logits of new tokens [batch, s] at positions [batch, s]
    (every row at the same positions), attending to the cached earlier tokens
    -> (logits [batch, s, vocab] float32, cache with the new tokens added).
    A prefill is decode(prompt, positions=arange(P)), then one token per call."""
    logits, _, cache = self._forward(tokens, positions=positions, segment_ids=None,
                                     step=None, train=False, cache=cache)
    return logits, cache

  def _forward(self, tokens, *, positions, segment_ids, step, train, cache):
    # Gather the table whole before the lookup (FSDP semantics): a gather from a
    # table split over (vocab, embed) makes XLA replicate it the slow way.
    table = constrain(self.embed[...], (None, None))
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)
    x = constrain(x, ("batch", "seq", "act_embed"))
    per_layer, weights = [], []
    new_cache = None if cache is None else list(cache)
    kwargs = dict(positions=positions, segment_ids=segment_ids, token_ids=tokens,
                  step=step, train=train)
    decode_kwargs = dict(positions=positions, token_ids=tokens)
    i = 0
    while i < len(self.blocks):
      if i == self.loop_start:
        looped = list(self.blocks)[self.loop_start:self.loop_end]
        if cache is None:
          x, aux = run_loop(looped, x, iterations=self.iterations, remat=self.remat,
                            combine_aux=combine_aux, **kwargs)
        else:
          x, new_cache[self.loop_start:self.loop_end] = decode_loop(
              looped, x, cache[self.loop_start:self.loop_end], iterations=self.iterations,
              **decode_kwargs)
          aux = {}
        weights.append(float((self.loop_end - self.loop_start) * self.iterations))
        i = self.loop_end
      else:
        if cache is None:
          x, aux = self.blocks[i](x, loop_index=None, **kwargs)
        else:
          x, new_cache[i] = self.blocks[i].decode(x, loop_index=None, cache=cache[i],
                                                  **decode_kwargs)
          aux = {}
        weights.append(1.0)
        i += 1
      per_layer.append(aux)
      for _, _, name, j in (entry for entry in self.inserted_after if entry[0] == i):
        y, aux = getattr(self, name)[j](x, token_ids=tokens, loop_index=None, step=step,
                                        train=train)
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
    return logits.astype(jnp.float32), combine_aux(per_layer, weights), new_cache
