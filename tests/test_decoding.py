"""Cached decoding equals the full forward pass, for every sublayer and layer plan.

The reference is the model's own evaluation-mode forward pass over the whole
sequence: the logits of a prefill followed by one cached step per token must
equal it at every position. (tests/test_sample.py compares greedy sampling from
a trained checkpoint with a loop that recomputes the sequence per token.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config.files import load_config
from moejax.generate import Generator, filter_logits, full_forward_logits, next_token
from moejax.model.transformer import Transformer
from moejax.train import model_inputs

VOCAB = 264  # the byte tokenizer's

PRESETS = {
    "dense": "configs/dense.py:tiny",
    "topk_moe": "configs/moe.py:mixtral_tiny",
    "omnimoe": "configs/omnimoe.py:tiny",
    "peer": "configs/omnimoe.py:peer_tiny",
    "mohge": "configs/mohge.py:tiny",
    "looped": "configs/loopmoe.py:loopmoe_tiny",
    "l3": "configs/l3.py:lzw_tiny",
}


def _perturb_zero_inits(model, seed=0):
  """Parameters that start at zero (L3's W_mix, IterAdaLN's W_mod) are given values,
  and BatchNorm statistics moved off (0, 1), so that every path matters."""
  state = nnx.state(model)
  flat = nnx.to_flat_state(state)
  key = jax.random.key(seed)
  for path, var in flat:
    name = "/".join(str(p) for p in path)
    if any(tag in name for tag in ("w_mix", "w_mod", "b_mod", "running_mean", "running_var")):
      key, sub = jax.random.split(key)
      value = var[...]
      noise = 0.05 * jax.random.normal(sub, value.shape, value.dtype)
      var[...] = (jnp.abs(value + noise) + 0.5) if "var" in name else value + noise
  return model


def _model(name):
  cfg = load_config(PRESETS[name])
  inputs = model_inputs(cfg, None, VOCAB, shapes_only=True, say=lambda _: None)
  model = Transformer(cfg, VOCAB, nnx.Rngs(params=0), inputs=inputs)
  return _perturb_zero_inits(model)


@pytest.mark.parametrize("name", list(PRESETS))
def test_cached_decoding_equals_full_forward_at_every_position(name):
  model = _model(name)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  prompt = [257] + list(np.random.default_rng(1).integers(0, 256, 6))
  gen = Generator(graphdef, params, rest, max_len=24)
  tokens, cached = gen.generate(prompt, max_new_tokens=10, temperature=1.0, seed=3,
                                num_samples=2, return_logits=True)
  sequence = np.concatenate([np.broadcast_to(prompt, (2, len(prompt))), tokens], axis=1)
  full = full_forward_logits(graphdef, params, rest, jnp.asarray(sequence[:, :-1]))
  assert cached.shape == full.shape == (2, len(prompt) + 9, VOCAB)
  np.testing.assert_allclose(cached, np.asarray(full), rtol=2e-4, atol=2e-4)
  assert not np.array_equal(tokens[0], tokens[1])  # two samples, two draws


def test_filters_keep_exactly_the_top_k_and_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.05, 0.2, 0.15, 0.1]]))
  kept = lambda **kw: set(np.flatnonzero(np.asarray(filter_logits(logits, **kw))[0] > -1e30))
  assert kept(top_k=2, top_p=1.0) == {0, 2}
  assert kept(top_k=0, top_p=0.5) == {0}           # 0.5 alone reaches 0.5
  assert kept(top_k=0, top_p=0.7) == {0, 2}        # 0.5 + 0.2
  assert kept(top_k=0, top_p=0.71) == {0, 2, 3}
  assert kept(top_k=2, top_p=0.9) == {0, 2}
  key = jax.random.key(0)
  assert int(next_token(logits, key, temperature=0.0, top_k=0, top_p=1.0)[0]) == 0
  draws = [int(next_token(logits, k, temperature=1.0, top_k=0, top_p=0.7)[0])
           for k in jax.random.split(key, 200)]
  assert set(draws) == {0, 2}
  # Relative frequencies follow the renormalised probabilities 0.5/0.7 and 0.2/0.7.
  assert abs(draws.count(0) / 200 - 0.5 / 0.7) < 0.1
