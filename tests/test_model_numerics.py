"""Model pieces against references written out from their equations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.model.attention import Attention
from moejax.model.dense_ffn import SwiGLU
from moejax.model.norm import RMSNorm
from moejax.model.rotary import apply_rotary
from tests.helpers import tiny_config


def test_rmsnorm_matches_formula():
  x = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32)
  norm = RMSNorm(16, eps=1e-6)
  norm.scale[...] = jnp.arange(16, dtype=jnp.float32) / 8
  want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * (np.arange(16) / 8)
  np.testing.assert_allclose(norm(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)


def _naive_rope(vec, pos, theta):
  """Rotates each pair (i, i + d/2) by angle pos * theta^(-2i/d)."""
  d = vec.shape[-1]
  out = np.empty_like(vec)
  for i in range(d // 2):
    a = pos * theta ** (-2.0 * i / d)
    out[i] = vec[i] * math.cos(a) - vec[i + d // 2] * math.sin(a)
    out[i + d // 2] = vec[i + d // 2] * math.cos(a) + vec[i] * math.sin(a)
  return out


def test_rotary_matches_per_element_formula_and_is_relative():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, 3, 8)).astype(np.float32)
  pos = rng.integers(0, 50, size=(2, 6))
  got = np.asarray(apply_rotary(jnp.asarray(x), jnp.asarray(pos), 10_000.0))
  for b in range(2):
    for s in range(6):
      for h in range(3):
        np.testing.assert_allclose(got[b, s, h], _naive_rope(x[b, s, h], pos[b, s], 1e4),
                                   rtol=1e-4, atol=1e-5)
  # q.k depends only on the position difference.
  q, k = x[0, 0, 0], x[0, 1, 0]
  dots = [np.dot(_naive_rope(q, p + 7, 1e4), _naive_rope(k, p, 1e4)) for p in (0, 11, 30)]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-4)


def _naive_attention(attn: Attention, x, positions, segment_ids):
  """Per query token loop: softmax over earlier tokens of the same document."""
  wq, wk, wv, wo = (np.asarray(w[...]) for w in (attn.wq, attn.wk, attn.wv, attn.wo))
  b, s, _ = x.shape
  h, kv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
  out = np.zeros_like(x)
  for bi in range(b):
    q = np.einsum("sd,dhk->shk", x[bi], wq)
    k = np.einsum("sd,dhk->shk", x[bi], wk)
    v = np.einsum("sd,dhk->shk", x[bi], wv)
    for t in range(s):
      q[t] = np.stack([_naive_rope(q[t, j], positions[bi, t], attn.rope_theta) for j in range(h)])
      k[t] = np.stack([_naive_rope(k[t, j], positions[bi, t], attn.rope_theta) for j in range(kv)])
    for t in range(s):
      heads = []
      for j in range(h):
        kvh = j // (h // kv)
        allowed = [u for u in range(t + 1) if segment_ids[bi, u] == segment_ids[bi, t]]
        scores = np.array([q[t, j] @ k[u, kvh] for u in allowed]) / math.sqrt(hd)
        p = np.exp(scores - scores.max())
        p /= p.sum()
        heads.append(sum(pi * v[u, kvh] for pi, u in zip(p, allowed)))
      out[bi, t] = np.einsum("hk,hkd->d", np.stack(heads), wo)
  return out


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_matches_per_token_loop(num_heads, num_kv_heads):
  cfg = tiny_config(**{"model.num_heads": num_heads, "model.num_kv_heads": num_kv_heads})
  attn = Attention(cfg.model, nnx.Rngs(params=3))
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 7, cfg.model.d_model)).astype(np.float32)
  segment_ids = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 2, 2, 2, 3, 3, 3]])
  positions = np.array([[0, 1, 2, 0, 1, 2, 3], [5, 0, 1, 2, 0, 1, 2]])
  got = attn(jnp.asarray(x), positions=jnp.asarray(positions),
             segment_ids=jnp.asarray(segment_ids))
  want = _naive_attention(attn, x, positions, segment_ids)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)


def test_swiglu_matches_formula_and_has_empty_aux():
  ffn = SwiGLU(8, 12, init_std=0.5, num_layers=1, rngs=nnx.Rngs(params=0))
  x = np.random.default_rng(3).normal(size=(2, 3, 8)).astype(np.float32)
  y, aux = ffn(jnp.asarray(x), token_ids=None, loop_index=None, train=True)
  g, u, d = (np.asarray(w[...]) for w in (ffn.w_gate, ffn.w_up, ffn.w_down))
  silu = lambda z: z / (1 + np.exp(-z))
  np.testing.assert_allclose(np.asarray(y), (silu(x @ g) * (x @ u)) @ d, rtol=1e-5, atol=1e-6)
  assert aux == {}


def test_bf16_compute_is_close_to_fp32_and_params_stay_fp32():
  from moejax.model.transformer import Transformer
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 264, size=(2, 16)))
  f32 = Transformer(tiny_config(), 264, nnx.Rngs(params=0))
  bf16 = Transformer(tiny_config(**{"model.compute_dtype": "bfloat16"}), 264,
                     nnx.Rngs(params=0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  a, _ = f32(tokens)
  b, _ = bf16(tokens)
  assert b.dtype == jnp.float32  # logits are upcast for the loss
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05)
  assert not np.allclose(np.asarray(a), np.asarray(b), atol=1e-7)  # bf16 really used


def test_tied_and_untied_embeddings_and_causality():
  from moejax.model.transformer import Transformer
  rng = np.random.default_rng(5)
  tokens = rng.integers(0, 264, size=(1, 12))
  for tie in (True, False):
    model = Transformer(tiny_config(**{"model.tie_embeddings": tie}), 264,
                        nnx.Rngs(params=0))
    assert hasattr(model, "unembed") != tie
    logits, _ = model(jnp.asarray(tokens))
    changed = tokens.copy()
    changed[0, 8:] = (changed[0, 8:] + 1) % 264
    logits2, _ = model(jnp.asarray(changed))
    # Positions before the change cannot see it.
    np.testing.assert_allclose(np.asarray(logits[0, :8]), np.asarray(logits2[0, :8]),
                               atol=1e-6)
    assert not np.allclose(np.asarray(logits[0, 8:]), np.asarray(logits2[0, 8:]))
