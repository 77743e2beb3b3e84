"""Naive references for the looped block (LoopMoE), written from the equations.

Nothing here imports moejax's loop or IterAdaLN code (moejax/model/loop.py,
moejax/papers/loopmoe/iter_adaln.py) or its Block: these are what they are checked
against.

  sinusoidal_pe(k, dim)   PE(k) = [sin(k w_i), cos(k w_i)], w_i = 10000^(-2i/dim)
  iter_adaln_ref(p, n, k, gate)
      v_k = W2 SiLU(W1 PE(k) + b1) + b2;  c = SiLU(v_k + W_h n)
      (g, b, a) = W_mod c + b_mod;  returns ((1 + g) n + b, 1 + a or None)
      numpy (float64) when n is a numpy array, else jax.numpy.
  unrolled_forward(model, tokens, plan, ...)
      the decoder with the looped block written as a Python loop:
        h = embed[tokens];  prefix blocks;  h_0 = h
        for k in 0..R-1:  h_{k+1} = the block layers applied to h_k at loop_index k
        suffix blocks;  RMSNorm;  logits = h E^T (tied unembedding)
      Each decoder layer is written out here (RMSNorm, IterAdaLN, residuals,
      gates); only the attention and FFN sublayers of the built model are called.
      A train-mode call updates the sublayers' state in place (router biases), one
      iteration after the other.
"""

import jax.numpy as jnp
import numpy as np


def _xp(*arrays):
  return np if all(isinstance(a, (np.ndarray, np.generic, float, int)) for a in arrays) else jnp


def silu(x, xp):
  return x / (1.0 + xp.exp(-x))


def sinusoidal_pe(k, dim: int, xp=np):
  half = dim // 2
  w = np.array([10_000.0 ** (-2.0 * i / dim) for i in range(half)])
  if xp is jnp:
    w = jnp.asarray(w, jnp.float32)
  angles = k * w
  return xp.concatenate([xp.sin(angles), xp.cos(angles)])


def adaln_params(mod, dtype=None) -> dict:
  """The weights of an IterAdaLN module as arrays (numpy `dtype` when given)."""
  names = ("w1", "b1", "w2", "b2", "w_h", "w_mod", "b_mod")
  if dtype is None:
    return {k: getattr(mod, k)[...] for k in names}
  return {k: np.asarray(getattr(mod, k)[...], dtype) for k in names}


def iter_adaln_ref(p: dict, n, k, gate: bool):
  """The IterAdaLN equations; n [..., d]. -> (modulated n, output gate or None)."""
  xp = _xp(n, *p.values())
  d = n.shape[-1]
  pe = sinusoidal_pe(float(k) if xp is np else k, p["w1"].shape[0], xp)
  v = silu(pe @ p["w1"] + p["b1"], xp) @ p["w2"] + p["b2"]
  c = silu(v + n @ p["w_h"], xp)
  mod = c @ p["w_mod"] + p["b_mod"]
  assert mod.shape[-1] == (3 if gate else 2) * d
  scale, shift = mod[..., :d], mod[..., d:2 * d]
  out = (1.0 + scale) * n + shift
  return out, (1.0 + mod[..., 2 * d:3 * d] if gate else None)


def rms_norm_ref(x, scale, eps):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def block_ref(block, x, *, loop_index, adaln, cfg, positions, segment_ids, tokens, train):
  """One pre-norm decoder layer; with `adaln`, both pre-norms are modulated by
  iteration loop_index (the block's attn_mod / ffn_mod weights)."""
  eps, gate = cfg.model.norm_eps, cfg.loop.adaln_gate
  n = rms_norm_ref(x, block.attn_norm.scale[...], eps)
  g = None
  if adaln:
    n, g = iter_adaln_ref(adaln_params(block.attn_mod), n, loop_index, gate)
  y = block.attn(n, positions=positions, segment_ids=segment_ids)
  x = x + (y if g is None else g * y)
  n = rms_norm_ref(x, block.ffn_norm.scale[...], eps)
  g = None
  if adaln:
    n, g = iter_adaln_ref(adaln_params(block.ffn_mod), n, loop_index, gate)
  y, aux = block.ffn(n, token_ids=tokens, loop_index=loop_index, step=None, train=train)
  x = x + (y if g is None else g * y)
  return x, aux


def unrolled_forward(model, tokens, cfg, *, train: bool, state_probe=None):
  """-> dict(logits, hidden=[h_0 .. h_R], layer_aux=[aux of each unlooped layer],
  iter_aux=[[aux of each block layer] for each iteration], states=[state_probe()
  after each iteration]) for cfg.loop's plan. Python loops, no scan."""
  lp, m = cfg.loop, cfg.model
  prefix, width, reps = lp.prefix_layers, lp.block_layers, lp.iterations
  assert width > 0
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  kw = dict(cfg=cfg, positions=positions, segment_ids=jnp.ones_like(tokens),
            tokens=tokens, train=train)
  blocks = [model.blocks[i] for i in range(m.num_layers)]
  x = model.embed[...][tokens]
  layer_aux, iter_aux, hidden, states = [], [], [], []
  for i in range(prefix):
    x, aux = block_ref(blocks[i], x, loop_index=None, adaln=False, **kw)
    layer_aux.append(aux)
  hidden.append(x)
  for k in range(reps):
    auxes = []
    for i in range(prefix, prefix + width):
      x, aux = block_ref(blocks[i], x, loop_index=k, adaln=lp.iter_adaln, **kw)
      auxes.append(aux)
    iter_aux.append(auxes)
    hidden.append(x)
    if state_probe is not None:
      states.append(state_probe())
  for i in range(prefix + width, m.num_layers):
    x, aux = block_ref(blocks[i], x, loop_index=None, adaln=False, **kw)
    layer_aux.append(aux)
  x = rms_norm_ref(x, model.final_norm.scale[...], m.norm_eps)
  logits = jnp.einsum("bsd,vd->bsv", x, model.embed[...])
  return dict(logits=logits, hidden=hidden, layer_aux=layer_aux, iter_aux=iter_aux,
              states=states)


def total_aux_losses(ref: dict) -> dict:
  """Every "loss/*" entry summed over the unlooped layers and over all iterations
  and layers of the looped block."""
  out = {}
  for aux in ref["layer_aux"] + [a for it in ref["iter_aux"] for a in it]:
    for key, value in aux.items():
      if key.startswith("loss/"):
        out[key] = out.get(key, 0.0) + value
  return out


def mean_cosine(a, b) -> float:
  """Mean over tokens of cos(a_t, b_t), numpy float64."""
  a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
  b = np.asarray(b, np.float64).reshape(-1, b.shape[-1])
  cos = np.sum(a * b, -1) / np.sqrt(np.sum(a * a, -1) * np.sum(b * b, -1))
  return float(np.mean(cos))


def adaln_matmul_flops(d: int, a: int, gate: bool) -> int:
  """Per token and site: W_h [d, a] and W_mod [a, m d] matmuls, 2 FLOPs a MAC."""
  return 2 * (d * a + a * (3 if gate else 2) * d)

